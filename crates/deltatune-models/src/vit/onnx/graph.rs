//! Patterns in an ONNX graph exported by PyTorch: who writes and reads a value, layer norms
//! (fused or decomposed), linear layers found through their biases, walks through reshaping
//! ops. Errors say which node or initializer does not fit.

use std::collections::{BTreeSet, HashMap};

use deltatune_core::onnx::{AttrValue, OnnxModel, OnnxNode};
use deltatune_core::{Error, Result};

/// A linear layer found through its bias: `output = input @ weight + bias`.
pub(super) struct Lin {
    /// The MatMul node.
    pub(super) node: usize,
    /// The weight initializer, `[in, out]`.
    pub(super) weight: String,
    pub(super) input: String,
    pub(super) output: String,
    pub(super) dims: [usize; 2],
}

/// A layer norm: `output = norm(input) * weight + bias`.
pub(super) struct Norm {
    pub(super) input: String,
    pub(super) output: String,
    pub(super) eps: f64,
}
/// Ops a forward walk passes through between a projection and the product it feeds.
const RESHAPING: [&str; 8] = [
    "Reshape",
    "Transpose",
    "Mul",
    "Div",
    "Cast",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// The graph with its edges indexed both ways.
pub(super) struct Graph<'a> {
    pub(super) m: &'a OnnxModel,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Graph<'a> {
    pub(super) fn new(m: &'a OnnxModel) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in m.nodes().iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            for v in &n.inputs {
                if !v.is_empty() {
                    consumers.entry(v.as_str()).or_default().push(i);
                }
            }
        }
        Graph {
            m,
            producer,
            consumers,
        }
    }

    pub(super) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Weights {
            path: self.m.path().to_path_buf(),
            msg: format!("not a DINOv2 backbone in the expected form: {msg}"),
        }
    }

    pub(super) fn node(&self, i: usize) -> &'a OnnxNode {
        &self.m.nodes()[i]
    }

    /// `name (op)` of a node, for messages.
    pub(super) fn show(&self, i: usize) -> String {
        let n = self.node(i);
        format!("`{}` ({})", n.name, n.op_type)
    }

    pub(super) fn producer_of(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub(super) fn consumers_of(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map_or(&[], |v| v.as_slice())
    }

    /// The node writing `value`, which must be an `op`.
    pub(super) fn expect_producer(&self, value: &str, op: &str, what: &str) -> Result<usize> {
        match self.producer_of(value) {
            Some(i) if self.node(i).op_type == op => Ok(i),
            Some(i) => Err(self.err(format!(
                "{what}: expected `{value}` to come from a {op} node, but {} writes it",
                self.show(i)
            ))),
            None => Err(self.err(format!(
                "{what}: expected `{value}` to come from a {op} node, but no node writes it"
            ))),
        }
    }

    /// The only node reading `value` with operator `op`.
    pub(super) fn only_consumer(&self, value: &str, op: &str, what: &str) -> Result<usize> {
        let found: Vec<usize> = self
            .consumers_of(value)
            .iter()
            .copied()
            .filter(|&i| self.node(i).op_type == op)
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => {
                let ops: Vec<String> = self
                    .consumers_of(value)
                    .iter()
                    .map(|&i| self.show(i))
                    .collect();
                Err(self.err(format!(
                    "{what}: expected a {op} node reading `{value}`; it is read by [{}]",
                    ops.join(", ")
                )))
            }
            many => Err(self.err(format!(
                "{what}: {} {op} nodes read `{value}` (expected one)",
                many.len()
            ))),
        }
    }

    /// The input of a binary node that is not `known`.
    pub(super) fn other_input(&self, i: usize, known: &str, what: &str) -> Result<&'a str> {
        let n = self.node(i);
        match n.inputs.as_slice() {
            [a, b] if a == known => Ok(b),
            [a, b] if b == known => Ok(a),
            _ => Err(self.err(format!(
                "{what}: {} should have two inputs, one of them `{known}`; it has {:?}",
                self.show(i),
                n.inputs
            ))),
        }
    }

    /// The single value of a scalar constant (initializer or `Constant` node).
    pub(super) fn scalar(&self, value: &str) -> Option<f64> {
        let t = self.m.constant(value)?;
        match self.m.f32_values(t) {
            Ok(v) if v.len() == 1 => Some(f64::from(v[0])),
            _ => None,
        }
    }

    /// An initializer's dims, required to exist.
    pub(super) fn init_dims(&self, name: &str, what: &str) -> Result<Vec<usize>> {
        match self.m.initializer(name) {
            Some(t) if t.dims.iter().all(|&d| d >= 0) => Ok(t.shape()),
            Some(t) => Err(self.err(format!("{what}: `{name}` has dims {:?}", t.dims))),
            None => Err(Error::MissingTensor {
                key: name.to_string(),
                path: self.m.path().to_path_buf(),
                nearest: deltatune_core::error::nearest_names(name, self.m.initializer_names(), 3),
            }),
        }
    }

    /// The initializer `name` with `shape`.
    pub(super) fn init_with(&self, name: &str, shape: &[usize], what: &str) -> Result<()> {
        let dims = self.init_dims(name, what)?;
        if dims != shape {
            return Err(Error::ShapeMismatch {
                key: name.to_string(),
                path: self.m.path().to_path_buf(),
                expected: shape.to_vec(),
                actual: dims,
                hint: format!(" ({what})"),
            });
        }
        Ok(())
    }

    /// A layer norm through its weight: a `LayerNormalization` node, or the decomposition
    /// `(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * weight + bias`.
    pub(super) fn layer_norm(&self, weight: &str, bias: &str, what: &str) -> Result<Norm> {
        if let Some(&i) = self.consumers_of(weight).iter().find(|&&i| {
            let n = self.node(i);
            n.op_type == "LayerNormalization" && n.inputs.get(1).is_some_and(|w| w == weight)
        }) {
            let n = self.node(i);
            if n.inputs.get(2).map(String::as_str) != Some(bias) {
                return Err(self.err(format!(
                    "{what}: {} does not read the bias `{bias}`",
                    self.show(i)
                )));
            }
            if let Some(AttrValue::Int(axis)) = n.attribute("axis") {
                if *axis != -1 {
                    return Err(
                        self.err(format!("{what}: {} normalises axis {axis}", self.show(i)))
                    );
                }
            }
            let eps = match n.attribute("epsilon") {
                Some(AttrValue::Float(e)) => f64::from(*e),
                _ => 1e-5,
            };
            return Ok(Norm {
                input: first(&n.inputs).to_string(),
                output: first(&n.outputs).to_string(),
                eps,
            });
        }
        let mul = self.only_consumer(weight, "Mul", what)?;
        let normed = self.other_input(mul, weight, what)?;
        let add = self
            .consumers_of(first(&self.node(mul).outputs))
            .iter()
            .copied()
            .find(|&i| {
                let n = self.node(i);
                n.op_type == "Add" && n.inputs.iter().any(|v| v == bias)
            })
            .ok_or_else(|| {
                self.err(format!(
                    "{what}: no Add node adds the bias `{bias}` to the output of {}",
                    self.show(mul)
                ))
            })?;
        let div = self.expect_producer(normed, "Div", what)?;
        let [centered, std] = self.two_inputs(div, what)?;
        let sub = self.expect_producer(centered, "Sub", what)?;
        let [input, mean] = self.two_inputs(sub, what)?;
        let rm = self.expect_producer(mean, "ReduceMean", what)?;
        if self.node(rm).inputs.first().map(String::as_str) != Some(input) {
            return Err(self.err(format!(
                "{what}: {} does not average the norm's input `{input}`",
                self.show(rm)
            )));
        }
        let sqrt = self.expect_producer(std, "Sqrt", what)?;
        let add_eps = self.expect_producer(first(&self.node(sqrt).inputs), "Add", what)?;
        let eps = self
            .node(add_eps)
            .inputs
            .iter()
            .find_map(|v| self.scalar(v))
            .ok_or_else(|| {
                self.err(format!(
                    "{what}: {} adds no scalar constant (the epsilon)",
                    self.show(add_eps)
                ))
            })?;
        Ok(Norm {
            input: input.to_string(),
            output: first(&self.node(add).outputs).to_string(),
            eps,
        })
    }

    pub(super) fn two_inputs(&self, i: usize, what: &str) -> Result<[&'a str; 2]> {
        match self.node(i).inputs.as_slice() {
            [a, b] => Ok([a.as_str(), b.as_str()]),
            other => Err(self.err(format!(
                "{what}: {} should have two inputs, has {other:?}",
                self.show(i)
            ))),
        }
    }

    /// The linear layer whose output gets the bias `bias` (`[out]`) added.
    pub(super) fn linear(&self, bias: &str, what: &str) -> Result<Lin> {
        let bias_dims = self.init_dims(bias, what)?;
        let add = self.only_consumer(bias, "Add", what)?;
        let product = self.other_input(add, bias, what)?;
        let mm = self.expect_producer(product, "MatMul", what)?;
        let [input, weight] = self.two_inputs(mm, what)?;
        let dims = match self.m.initializer(weight) {
            Some(t) if t.dims.len() == 2 && t.dims.iter().all(|&d| d > 0) => {
                [t.dims[0] as usize, t.dims[1] as usize]
            }
            Some(t) => {
                return Err(self.err(format!(
                    "{what}: the weight `{weight}` of {} has dims {:?}, expected [in, out]",
                    self.show(mm),
                    t.dims
                )))
            }
            None => {
                return Err(self.err(format!(
                    "{what}: the second input `{weight}` of {} is not an initializer",
                    self.show(mm)
                )))
            }
        };
        if bias_dims != [dims[1]] {
            return Err(self.err(format!(
                "{what}: the weight `{weight}` is {dims:?} ([in, out]) but the bias `{bias}` is \
                 {bias_dims:?}"
            )));
        }
        Ok(Lin {
            node: mm,
            weight: weight.to_string(),
            input: input.to_string(),
            output: first(&self.node(add).outputs).to_string(),
            dims,
        })
    }

    /// Walks forward from `value` through reshaping ops to the MatMul reading it; returns the
    /// MatMul, which of its inputs it is, and the nodes passed.
    pub(super) fn forward_to_matmul(
        &self,
        value: &str,
        what: &str,
    ) -> Result<(usize, usize, Vec<usize>)> {
        let mut cur = value.to_string();
        let mut passed = Vec::new();
        for _ in 0..12 {
            let next: Vec<usize> = self
                .consumers_of(&cur)
                .iter()
                .copied()
                .filter(|&i| self.node(i).op_type != "Shape")
                .collect();
            let [i] = next.as_slice() else {
                return Err(self.err(format!(
                    "{what}: `{cur}` is read by {} nodes besides Shape, expected one on the way \
                     to the attention product",
                    next.len()
                )));
            };
            let n = self.node(*i);
            if n.op_type == "MatMul" {
                let slot = n.inputs.iter().position(|v| *v == cur).unwrap_or(0);
                return Ok((*i, slot, passed));
            }
            if !RESHAPING.contains(&n.op_type.as_str()) {
                return Err(self.err(format!(
                    "{what}: {} on the way from `{value}` to the attention product is not a \
                     reshaping op",
                    self.show(*i)
                )));
            }
            passed.push(*i);
            cur = first(&n.outputs).to_string();
        }
        Err(self.err(format!("{what}: no MatMul within 12 nodes after `{value}`")))
    }

    /// The values of a shape operand: a constant, or a Concat of constants and computed parts
    /// (`None`).
    pub(super) fn shape_values(&self, value: &str) -> Vec<Option<i64>> {
        if let Some(t) = self.m.constant(value) {
            return self
                .m
                .i64_values(t)
                .map(|v| v.into_iter().map(Some).collect())
                .unwrap_or_default();
        }
        match self.producer_of(value) {
            Some(i) if self.node(i).op_type == "Concat" => self
                .node(i)
                .inputs
                .iter()
                .flat_map(|v| match self.m.constant(v) {
                    Some(t) => self
                        .m
                        .i64_values(t)
                        .map(|v| v.into_iter().map(Some).collect())
                        .unwrap_or_else(|_| vec![None]),
                    None => vec![None],
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the data of `value` comes from `target` within `depth` producers. Shape
    /// computations do not count: a `Shape` node ends the walk.
    pub(super) fn derives_from(&self, value: &str, target: &str, depth: usize) -> bool {
        let mut frontier = vec![value];
        let mut seen = BTreeSet::new();
        for _ in 0..=depth {
            let mut next = Vec::new();
            for v in frontier {
                if v == target {
                    return true;
                }
                if !seen.insert(v) {
                    continue;
                }
                if let Some(i) = self.producer_of(v) {
                    let n = self.node(i);
                    if n.op_type != "Shape" {
                        next.extend(
                            n.inputs
                                .iter()
                                .filter(|v| !v.is_empty())
                                .map(String::as_str),
                        );
                    }
                }
            }
            frontier = next;
        }
        false
    }

    /// Op types on the paths from `from` back to `start` (exclusive), at most 32 nodes.
    pub(super) fn ops_between(&self, start: &str, from: &str, what: &str) -> Result<Vec<String>> {
        let mut ops = Vec::new();
        let mut stack = vec![from.to_string()];
        let mut seen = BTreeSet::new();
        let mut reached = false;
        while let Some(v) = stack.pop() {
            if v == start {
                reached = true;
                continue;
            }
            if self.m.constant(&v).is_some() || !seen.insert(v.clone()) {
                continue;
            }
            let Some(i) = self.producer_of(&v) else {
                continue;
            };
            if seen.len() > 32 {
                break;
            }
            ops.push(self.node(i).op_type.clone());
            stack.extend(
                self.node(i)
                    .inputs
                    .iter()
                    .filter(|v| !v.is_empty())
                    .cloned(),
            );
        }
        if !reached {
            return Err(self.err(format!(
                "{what}: `{from}` does not derive from `{start}` within 32 nodes"
            )));
        }
        Ok(ops)
    }

    /// Whether `to` is written by a `Gelu` node (opset 20) without the tanh approximation
    /// reading `from`.
    pub(super) fn gelu_node(&self, from: &str, to: &str) -> bool {
        self.producer_of(to).is_some_and(|i| {
            let n = self.node(i);
            n.op_type == "Gelu"
                && n.inputs.first().map(String::as_str) == Some(from)
                && !matches!(n.attribute("approximate"), Some(AttrValue::String(a)) if a == b"tanh")
        })
    }

    /// `residual + scale * branch`: the Mul by `lambda` (`[hidden]`) of `branch` and the Add
    /// of `residual`; returns the sum.
    pub(super) fn scaled_residual(
        &self,
        lambda: &str,
        branch: &str,
        residual: &str,
        hidden: usize,
        what: &str,
    ) -> Result<String> {
        self.init_with(lambda, &[hidden], what)?;
        let mul = self.only_consumer(lambda, "Mul", what)?;
        if self.other_input(mul, lambda, what)? != branch {
            return Err(self.err(format!(
                "{what}: {} scales `{}`, not the sub-layer output `{branch}`",
                self.show(mul),
                self.other_input(mul, lambda, what)?
            )));
        }
        let scaled = first(&self.node(mul).outputs);
        let add = self.only_consumer(scaled, "Add", what)?;
        if self.other_input(add, scaled, what)? != residual {
            return Err(self.err(format!(
                "{what}: {} adds `{}` to the scaled branch, not the residual `{residual}`",
                self.show(add),
                self.other_input(add, scaled, what)?
            )));
        }
        Ok(first(&self.node(add).outputs).to_string())
    }
}

/// The first of a node's values, or "" when it has none (a damaged graph: the mapping then
/// fails with an error naming what it looked for, not an index panic).
pub(super) fn first(values: &[String]) -> &str {
    values.first().map_or("", String::as_str)
}
