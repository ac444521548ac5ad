//! Shelfsync hub: merges every store into one availability view and serves headquarters and the
//! online storefront.
