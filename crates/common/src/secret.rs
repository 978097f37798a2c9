//! A wrapper for secret values: masked in `Debug`, zeroed on drop, read only by `expose()`.

use std::fmt;

use zeroize::Zeroize;

/// A secret value. Printing it prints a mask; reading it is the visible act `expose()`.
pub struct Secret<T: Zeroize> {
    inner: T,
}

impl<T: Zeroize> Secret<T> {
    pub fn new(inner: T) -> Self {
        Self { inner }
    }

    /// The secret itself. Every call site is a place a secret is handled.
    pub fn expose(&self) -> &T {
        &self.inner
    }
}

impl<T: Zeroize> From<T> for Secret<T> {
    fn from(inner: T) -> Self {
        Self::new(inner)
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.inner.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_value() {
        let secret = Secret::new(String::from("hunter2"));
        let printed = format!("{secret:?} {:?}", Some(&secret));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("REDACTED"));
        assert_eq!(secret.expose(), "hunter2");
    }
}
