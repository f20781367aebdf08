//! C ABI of massv (libmassv.so / libmassv.a). The API lands with the C ABI issue; this crate builds the libraries empty until then.
