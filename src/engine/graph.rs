//! What the engine changes in a decoder graph before ONNX Runtime loads it: the logits of the
//! last position only.
//!
//! A genai decoder computes logits for every position of its input, `[batch, tokens, vocab]`,
//! but the engine samples from the last position alone (prompts and prefill chunks included;
//! decode steps have one position anyway). On a prompt, the LM head's work for every other
//! position is thrown away: on SmolLM2-135M (vocabulary 49,152 over a hidden size of 576) it is
//! 30% of a 128-token prefill, and the `[1, tokens, vocab]` buffer for a 2,048-token prompt
//! would take 400 MB. [`last_position_logits`] puts a `Slice` of the last position between the
//! final normalization and the head, so the head runs on one position.
//!
//! The rewrite is made only where it provably changes nothing but the positions computed: the
//! head (every node downstream of the final normalization's output) must be built from that
//! output and constants alone, of operations that treat each position on its own, and must feed
//! no graph output but the logits. Anything else leaves the graph as shipped (`Ok(None)`).
//!
//! It works on the protobuf wire format (ModelProto → GraphProto → NodeProto), copying every
//! field it does not touch byte for byte, so fields this code has never heard of survive; the
//! weights stay in the external data file next to the graph.

use std::collections::{HashMap, HashSet, VecDeque};

/// Graphs larger than this (weights inline) are loaded as shipped: the rewrite would hold a
/// second copy of them in memory.
pub(crate) const MAX_GRAPH_BYTES: u64 = 64 << 20;

/// Why a graph could not be read; the caller loads it as shipped.
#[derive(Debug, thiserror::Error)]
#[error("malformed ONNX protobuf: {0}")]
pub(crate) struct Malformed(String);

fn malformed(what: impl Into<String>) -> Malformed {
    Malformed(what.into())
}

/// The graph of `model` (a serialized ModelProto) with its output `logits` computed for the
/// last position only, or `None` where the rewrite does not apply (see the module docs).
///
/// # Errors
/// [`Malformed`] when `model` is not a well-formed ModelProto.
pub(crate) fn last_position_logits(model: &[u8], logits: &str) -> Result<Option<Vec<u8>>, Malformed> {
    let model_fields = fields(model)?;
    let graphs: Vec<&Field> = model_fields.iter().filter(|f| f.number == MODEL_GRAPH).collect();
    let [graph_field] = graphs.as_slice() else { return Ok(None) };
    if opset(&model_fields)?.is_none_or(|v| v < 13) {
        // Slice takes its bounds as inputs from opset 10, ReduceSum its axes from 13.
        return Ok(None);
    }
    let graph = Graph::parse(graph_field.bytes()?)?;
    let Some(plan) = graph.plan(logits)? else { return Ok(None) };
    let new_graph = graph.rewrite(&plan)?;

    let mut out = Vec::with_capacity(model.len() + 256);
    for f in &model_fields {
        if f.number == MODEL_GRAPH {
            put_bytes(&mut out, MODEL_GRAPH, &new_graph);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(Some(out))
}

// Field numbers of onnx.proto (ONNX IR version 3 onwards).
const MODEL_GRAPH: u64 = 7;
const MODEL_OPSET_IMPORT: u64 = 8;
const OPSET_DOMAIN: u64 = 1;
const OPSET_VERSION: u64 = 2;
const GRAPH_NODE: u64 = 1;
const GRAPH_INITIALIZER: u64 = 5;
const GRAPH_OUTPUT: u64 = 12;
const VALUE_INFO_NAME: u64 = 1;
const NODE_INPUT: u64 = 1;
const NODE_OUTPUT: u64 = 2;
const NODE_NAME: u64 = 3;
const NODE_OP_TYPE: u64 = 4;
const NODE_ATTRIBUTE: u64 = 5;
const NODE_DOMAIN: u64 = 7;
const ATTRIBUTE_NAME: u64 = 1;
const ATTRIBUTE_TENSOR: u64 = 5;
const TENSOR_DIMS: u64 = 1;
const TENSOR_DATA_TYPE: u64 = 2;
const TENSOR_INT64_DATA: u64 = 7;
const TENSOR_NAME: u64 = 8;
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_DATA_LOCATION: u64 = 14;
const INT64: u64 = 7;

/// Element-wise operations: each output position depends on the same position of the inputs
/// (the other inputs being constants, which the plan checks).
const ELEMENTWISE: &[&str] = &["Add", "Sub", "Mul", "Div", "Cast", "Tanh", "Sigmoid", "Relu", "Identity"];
/// Matrix products over the last axis of a region input and a constant.
const PRODUCTS: &[&str] = &["MatMul", "MatMulNBits"];
/// Reductions: allowed over axes past batch and position only.
const REDUCTIONS: &[&str] = &["ReduceSum", "ReduceMean", "ReduceMax"];

/// One field of a protobuf message: its number, its whole encoding (key included) and its
/// payload.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    number: u64,
    raw: &'a [u8],
    value: Value<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Field<'a> {
    fn bytes(&self) -> Result<&'a [u8], Malformed> {
        match self.value {
            Value::Bytes(b) => Ok(b),
            _ => Err(malformed(format!("field {} is not length-delimited", self.number))),
        }
    }

    fn str(&self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes()?).map_err(|_| malformed(format!("field {} is not UTF-8", self.number)))
    }

    fn varint(&self) -> Result<u64, Malformed> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(malformed(format!("field {} is not a varint", self.number))),
        }
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *buf.get(*pos).ok_or_else(|| malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

/// The fields of one message, in order.
fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, Malformed> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 {
            return Err(malformed("field number 0"));
        }
        let value = match wire {
            0 => Value::Varint(read_varint(buf, &mut pos)?),
            1 | 5 => {
                let width = if wire == 1 { 8 } else { 4 };
                pos = pos.checked_add(width).filter(|&p| p <= buf.len()).ok_or_else(|| malformed("truncated fixed-width field"))?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).map_err(|_| malformed("length overflows"))?;
                let end = pos.checked_add(len).filter(|&e| e <= buf.len()).ok_or_else(|| malformed(format!("field {number} runs past its message")))?;
                let payload = &buf[pos..end];
                pos = end;
                Value::Bytes(payload)
            }
            other => return Err(malformed(format!("wire type {other} (groups are not used by ONNX)"))),
        };
        out.push(Field { number, raw: &buf[start..pos], value });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn put_varint_field(out: &mut Vec<u8>, number: u64, v: u64) {
    put_varint(out, number << 3);
    put_varint(out, v);
}

/// The default-domain opset version the model imports.
fn opset(model_fields: &[Field]) -> Result<Option<u64>, Malformed> {
    for f in model_fields.iter().filter(|f| f.number == MODEL_OPSET_IMPORT) {
        let mut domain = "";
        let mut version = None;
        for g in fields(f.bytes()?)? {
            match g.number {
                OPSET_DOMAIN => domain = g.str()?,
                OPSET_VERSION => version = Some(g.varint()?),
                _ => {}
            }
        }
        if domain.is_empty() || domain == "ai.onnx" {
            return Ok(version);
        }
    }
    Ok(None)
}

struct Node<'a> {
    raw: &'a [u8],
    inputs: Vec<&'a str>,
    outputs: Vec<&'a str>,
    op_type: &'a str,
    domain: &'a str,
    /// A `Constant` node's `value` tensor.
    value: Option<&'a [u8]>,
}

impl<'a> Node<'a> {
    fn parse(raw: &'a [u8]) -> Result<Self, Malformed> {
        let mut node = Node { raw, inputs: Vec::new(), outputs: Vec::new(), op_type: "", domain: "", value: None };
        for f in fields(raw)? {
            match f.number {
                NODE_INPUT => node.inputs.push(f.str()?),
                NODE_OUTPUT => node.outputs.push(f.str()?),
                NODE_OP_TYPE => node.op_type = f.str()?,
                NODE_DOMAIN => node.domain = f.str()?,
                NODE_ATTRIBUTE => {
                    let attribute = fields(f.bytes()?)?;
                    let named_value = attribute.iter().any(|a| a.number == ATTRIBUTE_NAME && matches!(a.value, Value::Bytes(b"value")));
                    if named_value {
                        node.value = attribute.iter().find(|a| a.number == ATTRIBUTE_TENSOR).map(Field::bytes).transpose()?;
                    }
                }
                _ => {}
            }
        }
        Ok(node)
    }

    fn is_default_domain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }

    fn is_normalization(&self) -> bool {
        self.op_type.ends_with("LayerNormalization") || self.op_type == "RMSNormalization"
    }

    /// The node with every input named `from` renamed `to`; its other fields as they were.
    fn renamed_input(&self, from: &str, to: &str) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::with_capacity(self.raw.len() + to.len());
        for f in fields(self.raw)? {
            if f.number == NODE_INPUT && f.str()? == from {
                put_bytes(&mut out, NODE_INPUT, to.as_bytes());
            } else {
                out.extend_from_slice(f.raw);
            }
        }
        Ok(out)
    }
}

struct Graph<'a> {
    fields: Vec<Field<'a>>,
    /// Node `i` is `fields[node_fields[i]]`.
    node_fields: Vec<usize>,
    nodes: Vec<Node<'a>>,
    /// Initializer name → TensorProto.
    initializers: HashMap<&'a str, &'a [u8]>,
    outputs: Vec<&'a str>,
}

/// What the rewrite changes.
struct Plan {
    /// The normalization whose output 0 gets sliced.
    norm: usize,
    /// Its output, the head's input.
    hidden: String,
    /// The name of the sliced tensor (unused in the graph).
    last: String,
    /// The nodes that read `hidden`.
    readers: HashSet<usize>,
}

impl<'a> Graph<'a> {
    fn parse(raw: &'a [u8]) -> Result<Self, Malformed> {
        let all = fields(raw)?;
        let mut graph = Graph { fields: Vec::new(), node_fields: Vec::new(), nodes: Vec::new(), initializers: HashMap::new(), outputs: Vec::new() };
        for (i, f) in all.iter().enumerate() {
            match f.number {
                GRAPH_NODE => {
                    graph.node_fields.push(i);
                    graph.nodes.push(Node::parse(f.bytes()?)?);
                }
                GRAPH_INITIALIZER => {
                    let tensor = f.bytes()?;
                    if let Some(name) = fields(tensor)?.iter().find(|t| t.number == TENSOR_NAME) {
                        graph.initializers.insert(name.str()?, tensor);
                    }
                }
                GRAPH_OUTPUT => {
                    if let Some(name) = fields(f.bytes()?)?.iter().find(|v| v.number == VALUE_INFO_NAME) {
                        graph.outputs.push(name.str()?);
                    }
                }
                _ => {}
            }
        }
        graph.fields = all;
        Ok(graph)
    }

    /// Where to slice, if the head allows it (see the module docs).
    fn plan(&self, logits: &str) -> Result<Option<Plan>, Malformed> {
        if !self.outputs.contains(&logits) {
            return Ok(None);
        }
        let mut producer: HashMap<&str, usize> = HashMap::new();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in n.outputs.iter().filter(|o| !o.is_empty()) {
                producer.insert(o, i);
            }
            for &input in n.inputs.iter().filter(|i| !i.is_empty()) {
                readers.entry(input).or_default().push(i);
            }
        }
        let constants: HashMap<&str, &[u8]> = self
            .nodes
            .iter()
            .filter(|n| n.op_type == "Constant" && n.is_default_domain())
            .filter_map(|n| Some((*n.outputs.first()?, n.value?)))
            .chain(self.initializers.iter().map(|(&k, &v)| (k, v)))
            .collect();

        // The normalization nearest to the logits, walking back.
        let Some(&head_end) = producer.get(logits) else { return Ok(None) };
        let mut queue = VecDeque::from([head_end]);
        let mut seen = HashSet::from([head_end]);
        let norm = loop {
            let Some(i) = queue.pop_front() else { return Ok(None) };
            if self.nodes[i].is_normalization() {
                break i;
            }
            for input in &self.nodes[i].inputs {
                if let Some(&p) = producer.get(input) {
                    if seen.insert(p) {
                        queue.push_back(p);
                    }
                }
            }
        };
        let Some(&hidden) = self.nodes[norm].outputs.first() else { return Ok(None) };
        if self.outputs.contains(&hidden) {
            return Ok(None);
        }

        // The head: every node downstream of `hidden`.
        let mut region: HashSet<&str> = HashSet::from([hidden]);
        let mut head: HashSet<usize> = HashSet::new();
        let mut queue = VecDeque::from([hidden]);
        while let Some(t) = queue.pop_front() {
            for &r in readers.get(t).map(Vec::as_slice).unwrap_or(&[]) {
                if head.insert(r) {
                    for &o in self.nodes[r].outputs.iter().filter(|o| !o.is_empty()) {
                        if region.insert(o) {
                            queue.push_back(o);
                        }
                    }
                }
            }
        }
        if !region.contains(logits) {
            return Ok(None);
        }
        for &i in &head {
            let node = &self.nodes[i];
            if node.outputs.iter().any(|o| *o != logits && self.outputs.contains(o)) {
                return Ok(None);
            }
            // Built from the hidden state and constants alone.
            if !node.inputs.iter().all(|i| i.is_empty() || region.contains(i) || constants.contains_key(i)) {
                return Ok(None);
            }
            if !per_position(node, &constants)? {
                return Ok(None);
            }
        }

        let mut last = format!("{hidden}/edgeflow_last_position");
        while producer.contains_key(last.as_str()) || readers.contains_key(last.as_str()) || constants.contains_key(last.as_str()) {
            last.push('_');
        }
        let readers = readers.get(hidden).map(|r| r.iter().copied().collect()).unwrap_or_default();
        Ok(Some(Plan { norm, hidden: hidden.to_string(), last, readers }))
    }

    /// The graph with `plan` applied: the head reads the slice, which follows the
    /// normalization; its bounds are new initializers.
    fn rewrite(&self, plan: &Plan) -> Result<Vec<u8>, Malformed> {
        let bounds = [("starts", -1i64), ("ends", i64::MAX), ("axes", 1)].map(|(what, v)| (format!("{}/{what}", plan.last), v));
        let slice = {
            let mut node = Vec::new();
            put_bytes(&mut node, NODE_INPUT, plan.hidden.as_bytes());
            for (name, _) in &bounds {
                put_bytes(&mut node, NODE_INPUT, name.as_bytes());
            }
            put_bytes(&mut node, NODE_OUTPUT, plan.last.as_bytes());
            put_bytes(&mut node, NODE_NAME, plan.last.as_bytes());
            put_bytes(&mut node, NODE_OP_TYPE, b"Slice");
            node
        };
        let node_of_field: HashMap<usize, usize> = self.node_fields.iter().enumerate().map(|(n, &f)| (f, n)).collect();
        let mut out = Vec::new();
        for (i, f) in self.fields.iter().enumerate() {
            match node_of_field.get(&i) {
                Some(&n) if plan.readers.contains(&n) => {
                    put_bytes(&mut out, GRAPH_NODE, &self.nodes[n].renamed_input(&plan.hidden, &plan.last)?);
                }
                Some(&n) if n == plan.norm => {
                    out.extend_from_slice(f.raw);
                    put_bytes(&mut out, GRAPH_NODE, &slice);
                }
                _ => out.extend_from_slice(f.raw),
            }
        }
        for (name, v) in &bounds {
            let mut tensor = Vec::new();
            put_varint_field(&mut tensor, TENSOR_DIMS, 1);
            put_varint_field(&mut tensor, TENSOR_DATA_TYPE, INT64);
            put_bytes(&mut tensor, TENSOR_NAME, name.as_bytes());
            put_bytes(&mut tensor, TENSOR_RAW_DATA, &v.to_le_bytes());
            put_bytes(&mut out, GRAPH_INITIALIZER, &tensor);
        }
        Ok(out)
    }
}

/// Whether `node` computes each (batch, position) from that same (batch, position) of its
/// inputs, given that its other inputs are constants.
fn per_position(node: &Node, constants: &HashMap<&str, &[u8]>) -> Result<bool, Malformed> {
    let op = node.op_type;
    let ms = node.domain == "com.microsoft";
    if !(node.is_default_domain() || ms && op == "MatMulNBits") {
        return Ok(false);
    }
    if ELEMENTWISE.contains(&op) || PRODUCTS.contains(&op) {
        return Ok(true);
    }
    let constant_input = |k: usize| node.inputs.get(k).and_then(|n| constants.get(n)).map(|t| int64s(t)).transpose();
    if op == "Reshape" {
        // A shape that copies the batch and position dimensions (0 means "as the input").
        return Ok(constant_input(1)?.flatten().is_some_and(|s| s.len() >= 2 && s[0] == 0 && s[1] == 0));
    }
    if REDUCTIONS.contains(&op) {
        // Axes given (opset 13+) and none of them batch or position. Negative axes count from
        // the end; -1 is past the position axis in any tensor of rank 3 or more, which the head's
        // tensors are (`[batch, position, ...]`).
        return Ok(constant_input(1)?.flatten().is_some_and(|axes| !axes.is_empty() && axes.iter().all(|&a| a >= 2 || a == -1)));
    }
    Ok(false)
}

/// The values of an INT64 TensorProto held in the graph (`None` for another type or data
/// kept outside).
fn int64s(tensor: &[u8]) -> Result<Option<Vec<i64>>, Malformed> {
    let mut data_type = None;
    let mut values = Vec::new();
    let mut raw = None;
    for f in fields(tensor)? {
        match f.number {
            TENSOR_DATA_TYPE => data_type = Some(f.varint()?),
            TENSOR_DATA_LOCATION if f.varint()? != 0 => return Ok(None),
            TENSOR_INT64_DATA => match f.value {
                Value::Varint(v) => values.push(v as i64),
                Value::Bytes(packed) => {
                    let mut pos = 0;
                    while pos < packed.len() {
                        values.push(read_varint(packed, &mut pos)? as i64);
                    }
                }
                Value::Fixed => return Err(malformed("fixed-width int64_data")),
            },
            TENSOR_RAW_DATA => raw = Some(f.bytes()?),
            _ => {}
        }
    }
    if data_type != Some(INT64) {
        return Ok(None);
    }
    if let Some(raw) = raw {
        if raw.len() % 8 != 0 {
            return Err(malformed("INT64 raw data not a multiple of 8 bytes"));
        }
        values = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    }
    Ok(Some(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_field(number: u64, s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, number, s.as_bytes());
        out
    }

    fn node(op: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            n.extend(string_field(NODE_INPUT, i));
        }
        for o in outputs {
            n.extend(string_field(NODE_OUTPUT, o));
        }
        n.extend(string_field(NODE_OP_TYPE, op));
        if !domain.is_empty() {
            n.extend(string_field(NODE_DOMAIN, domain));
        }
        n
    }

    fn int64_tensor(name: &str, values: &[i64]) -> Vec<u8> {
        let mut t = Vec::new();
        put_varint_field(&mut t, TENSOR_DIMS, values.len() as u64);
        put_varint_field(&mut t, TENSOR_DATA_TYPE, INT64);
        t.extend(string_field(TENSOR_NAME, name));
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        put_bytes(&mut t, TENSOR_RAW_DATA, &raw);
        t
    }

    /// A ModelProto: opset 14, the nodes in order, the initializers, and the outputs.
    fn model(nodes: &[Vec<u8>], initializers: &[Vec<u8>], outputs: &[&str]) -> Vec<u8> {
        let mut graph = Vec::new();
        for n in nodes {
            put_bytes(&mut graph, GRAPH_NODE, n);
        }
        for t in initializers {
            put_bytes(&mut graph, GRAPH_INITIALIZER, t);
        }
        for o in outputs {
            put_bytes(&mut graph, GRAPH_OUTPUT, &string_field(VALUE_INFO_NAME, o));
        }
        let mut opset = string_field(OPSET_DOMAIN, "");
        put_varint_field(&mut opset, OPSET_VERSION, 14);
        let mut m = Vec::new();
        put_varint_field(&mut m, 1, 8); // ir_version, which the rewrite must carry over
        put_bytes(&mut m, MODEL_GRAPH, &graph);
        put_bytes(&mut m, MODEL_OPSET_IMPORT, &opset);
        m
    }

    /// The last layer and a SmolLM2-style head: a block-sum correction through a Reshape and
    /// a ReduceSum beside the quantized product.
    fn decoder(head_reshape: &[i64], reduce_axes: &[i64]) -> Vec<u8> {
        model(
            &[
                node("GroupQueryAttention", "com.microsoft", &["qkv", "", ""], &["attn", "present.0.key", "present.0.value"]),
                node("SkipSimplifiedLayerNormalization", "com.microsoft", &["attn", "residual", "norm.weight"], &["hidden", "", "", "sum"]),
                node("MatMulNBits", "com.microsoft", &["hidden", "head.q4", "head.scales"], &["head.main"]),
                node("Constant", "", &[], &["shape"]),
                node("Reshape", "", &["hidden", "shape"], &["blocks"]),
                node("ReduceSum", "", &["blocks", "axes"], &["block_sums"]),
                node("MatMul", "", &["block_sums", "head.offsets"], &["head.offset"]),
                node("Add", "", &["head.main", "head.offset"], &["logits"]),
            ],
            &[
                int64_tensor("shape", head_reshape),
                int64_tensor("axes", reduce_axes),
                int64_tensor("head.q4", &[0]),
                int64_tensor("head.scales", &[0]),
                int64_tensor("head.offsets", &[0]),
            ],
            &["logits", "present.0.key", "present.0.value"],
        )
    }

    fn graph_nodes(model: &[u8]) -> Vec<(String, Vec<String>, Vec<String>)> {
        let graph = fields(model).unwrap().into_iter().find(|f| f.number == MODEL_GRAPH).unwrap();
        let graph = Graph::parse(graph.bytes().unwrap()).unwrap();
        graph.nodes.iter().map(|n| (n.op_type.to_string(), n.inputs.iter().map(|s| s.to_string()).collect(), n.outputs.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn the_head_reads_the_last_position_of_the_final_norm() {
        // The shape comes from the initializer named like the Constant node's output (the
        // Constant node carries no value here), and the ReduceSum's axes too.
        let before = decoder(&[0, 0, 18, 32], &[-1]);
        let after = last_position_logits(&before, "logits").unwrap().expect("the rewrite applies");
        let nodes = graph_nodes(&after);
        let last = "hidden/edgeflow_last_position";
        let slice = nodes.iter().position(|(op, ..)| op == "Slice").expect("a Slice node");
        assert_eq!(slice, 2, "the slice follows the normalization");
        assert_eq!(nodes[slice].1, vec!["hidden".to_string(), format!("{last}/starts"), format!("{last}/ends"), format!("{last}/axes")]);
        assert_eq!(nodes[slice].2, vec![last.to_string()]);
        for (op, inputs, _) in &nodes {
            if op == "MatMulNBits" || op == "Reshape" {
                assert_eq!(inputs[0], last, "{op} reads the slice");
            }
        }
        assert_eq!(nodes.len(), 9);
        // Everything else is carried over: the ir_version field and the opset.
        assert_eq!(&after[..2], &before[..2]);
        let model_fields = fields(&after).unwrap();
        assert_eq!(opset(&model_fields).unwrap(), Some(14));
        let graph = Graph::parse(model_fields.iter().find(|f| f.number == MODEL_GRAPH).unwrap().bytes().unwrap()).unwrap();
        assert_eq!(int64s(graph.initializers[format!("{last}/starts").as_str()]).unwrap(), Some(vec![-1]));
        assert_eq!(int64s(graph.initializers[format!("{last}/ends").as_str()]).unwrap(), Some(vec![i64::MAX]));
        assert_eq!(int64s(graph.initializers[format!("{last}/axes").as_str()]).unwrap(), Some(vec![1]));
        // A rewritten graph is not rewritten again: the slice is not a per-position operation.
        assert!(last_position_logits(&after, "logits").unwrap().is_none());
    }

    #[test]
    fn heads_that_mix_positions_are_left_as_shipped() {
        for (what, reshape, axes) in [
            ("a reshape that folds positions", vec![0i64, -1], vec![-1i64]),
            ("a reshape that moves batch", vec![-1i64, 0, 18, 32], vec![-1]),
            ("a sum over positions", vec![0, 0, 18, 32], vec![1]),
            ("a sum over batch", vec![0, 0, 18, 32], vec![0, 3]),
            ("a sum with no axes", vec![0, 0, 18, 32], vec![]),
        ] {
            assert!(last_position_logits(&decoder(&reshape, &axes), "logits").unwrap().is_none(), "{what}");
        }
        // A head reading something computed per position other than the hidden state.
        let m = model(
            &[
                node("SimplifiedLayerNormalization", "", &["x", "w"], &["hidden"]),
                node("MatMul", "", &["hidden", "w"], &["head"]),
                node("Add", "", &["head", "input_bias"], &["logits"]),
            ],
            &[int64_tensor("w", &[1])],
            &["logits"],
        );
        assert!(last_position_logits(&m, "logits").unwrap().is_none(), "a non-constant input");
        // A head that feeds another output.
        let m = model(
            &[node("SimplifiedLayerNormalization", "", &["x", "w"], &["hidden"]), node("MatMul", "", &["hidden", "w"], &["logits"])],
            &[int64_tensor("w", &[1])],
            &["logits", "hidden"],
        );
        assert!(last_position_logits(&m, "logits").unwrap().is_none(), "the hidden state is an output");
        // An operation not known to be per position.
        let m =
            model(&[node("SimplifiedLayerNormalization", "", &["x", "w"], &["hidden"]), node("Softmax", "", &["hidden"], &["logits"])], &[int64_tensor("w", &[1])], &["logits"]);
        assert!(last_position_logits(&m, "logits").unwrap().is_none(), "Softmax");
        // No normalization before the logits; logits not an output.
        let m = model(&[node("MatMul", "", &["x", "w"], &["logits"])], &[int64_tensor("w", &[1])], &["logits"]);
        assert!(last_position_logits(&m, "logits").unwrap().is_none(), "no normalization");
        assert!(last_position_logits(&decoder(&[0, 0, 18, 32], &[-1]), "other").unwrap().is_none(), "another output name");
    }

    #[test]
    fn malformed_protobuf_is_an_error_not_a_panic() {
        let good = decoder(&[0, 0, 18, 32], &[-1]);
        // Every truncation either fails to parse or is a shorter message that parses; none
        // panics.
        for cut in 0..good.len() {
            let _ = last_position_logits(&good[..cut], "logits");
        }
        for bad in [&[0x08][..], &[0xff; 11][..], &[0x3a, 0x05, 0x01][..], &[0x0b][..], &[0x00, 0x00][..]] {
            assert!(last_position_logits(bad, "logits").is_err(), "{bad:?}");
        }
        // Flipping any byte never panics either.
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0x5a;
            let _ = last_position_logits(&m, "logits");
        }
    }
}
