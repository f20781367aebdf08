//! Charts are drawn by the runtime crate (`massv::plot`), shared with `massv demo`.

pub use massv::plot::histogram_png;
