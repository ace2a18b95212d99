//! What every remote tier (a store shared over the network) is built from.

pub mod url;
