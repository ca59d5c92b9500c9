//! The protected-machine agent: NBD front end, write capture, change stream
