//! Architecture-specific parts of a guest's life. lguest runs x86-64 guests only.
pub mod x86_64;
