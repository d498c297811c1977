//! The C interface of `nn/csrc` (the `tch` build only): how its error codes become messages.

use std::ffi::{c_char, c_int};

const ERROR_CAPACITY: usize = 2048;

/// Calls `body` with an error buffer; a non-zero return becomes the buffer's message.
pub(crate) fn checked(body: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut error = vec![0u8; ERROR_CAPACITY];
    let code = body(error.as_mut_ptr().cast(), ERROR_CAPACITY);
    if code == 0 {
        return Ok(());
    }
    let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
    Err(String::from_utf8_lossy(&error[..end]).into_owned())
}
