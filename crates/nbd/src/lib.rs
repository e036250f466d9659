//! NBD protocol (see issue 3).
