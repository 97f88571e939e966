//! The configuration file: parsing, includes, validation with file and line.
