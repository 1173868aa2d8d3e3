//! # engram-plugin
//!
//! The runtime a host inference engine calls: it holds every Engram layer's table and
//! weights, computes row indices at the start of each step, prefetches rows in the
//! background while the host's earlier layers run, and applies Engram to the host's
//! hidden states (candle tensors) at each Engram layer.
