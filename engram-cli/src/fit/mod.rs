//! Fitting Engram to a corpus on a frozen host model (`engram fit`) and measuring a model
//! on text (`engram eval`), through one forward: `llama` (the host, frozen), `layer`
//! (a trainable paper-variant Engram layer and its sparse table), `model` (the two
//! joined where the runtime joins them, and the loss), `adam` (the dense weights'
//! optimizer), `data` (files to token windows), `checkpoint` (the Engram file),
//! `train`, `eval` and `greedy` (the commands: `greedy-examples` compares greedy
//! continuations with Engram and without). docs/fit.md tells what it does and measured.

pub mod adam;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod greedy;
pub mod layer;
pub mod llama;
pub mod model;
pub mod train;
