//! Routing a requested name to a site: exact, then wildcard, then the default site.
