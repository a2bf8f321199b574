"""What TensorRT 10's ONNX parser supports, and a CPU-side check of a graph against it.

The table is onnx-tensorrt's `docs/operators.md` at commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c
("ONNX-TensorRT 10.1 GA release", 2024-06-17; its header: "TensorRT 10.0 supports operators in
the inclusive range of opset 9 to opset 20"), encoded as data: the operators marked supported
with the types listed for them, the operators marked unsupported, and the restrictions we check
(`axes`/`axis` inputs that must be initializers, TopK's `sorted` = 1 and K < 3840). The table
lists `INF64` for ConstantOfShape: read as INT64. Its note "UINT8 is only supported as network
input or output tensor types" is why only Cast may read a UINT8 tensor.

`check_model(model)` walks every node (inside `If`/`Loop` bodies too), infers the type of every
value with ONNX shape inference and returns one line per problem; `prologue build-engines` and
`prologue export --tensorrt` run it before any build, and the test suite runs it on a
released-vocabulary export. Passing it does not prove that a build succeeds (TensorRT has limits
the table does not list), but failing it means the parser or a strongly typed build will refuse.
"""

from __future__ import annotations

import typing

OPERATORS_MD = "onnx-tensorrt docs/operators.md @ 96e781103cfc4adf4a6bb557e94bac8e693f6f4c (TensorRT 10.1 GA)"
TOPK_MAX_K = 3839  # "`K` input must be less than 3840"

# ONNX TensorProto data type -> the table's name
ONNX_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
                   16: "BF16", 17: "FP8", 22: "INT4"}

# inputs (by position) that the table requires to be initializers / constants
CONSTANT_INPUTS = {"CumSum": 1, "Pad": 3, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1,
                   "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1,
                   "ReduceSumSquare": 1, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "TopK": 1}
# operators whose listed types apply to every input (elementwise families), not just the first
ALL_INPUTS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "GreaterOrEqual", "Less",
              "LessOrEqual", "And", "Or", "Xor", "Concat", "Mod"}
SUPPORTED_TYPES = {
    "Abs": "FP32 FP16 BF16 INT32 INT64",
    "Acos": "FP32 FP16 BF16",
    "Acosh": "FP32 FP16 BF16",
    "Add": "FP32 FP16 BF16 INT32 INT64",
    "And": "BOOL",
    "ArgMax": "FP32 FP16 BF16 INT32 INT64",
    "ArgMin": "FP32 FP16 BF16 INT32 INT64",
    "Asin": "FP32 FP16 BF16",
    "Asinh": "FP32 FP16 BF16",
    "Atan": "FP32 FP16 BF16",
    "Atanh": "FP32 FP16 BF16",
    "AveragePool": "FP32 FP16 BF16",
    "BatchNormalization": "FP32 FP16 BF16",
    "Cast": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "CastLike": "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",
    "Ceil": "FP32 FP16 BF16",
    "Celu": "FP32 FP16 BF16",
    "Clip": "FP32 FP16 BF16",
    "Concat": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Constant": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ConstantOfShape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Conv": "FP32 FP16 BF16",
    "ConvTranspose": "FP32 FP16 BF16",
    "Cos": "FP32 FP16 BF16",
    "Cosh": "FP32 FP16 BF16",
    "CumSum": "FP32 FP16 BF16",
    "DeformConv": "FP32 FP16",
    "DepthToSpace": "FP32 FP16 BF16 INT32 INT64",
    "DequantizeLinear": "INT8 FP8 INT4",
    "Div": "FP32 FP16 BF16 INT32 INT64",
    "Dropout": "FP32 FP16 BF16",
    "Einsum": "FP32 FP16 BF16",
    "Elu": "FP32 FP16 BF16",
    "Equal": "FP32 FP16 BF16 INT32 INT64",
    "Erf": "FP32 FP16 BF16",
    "Exp": "FP32 FP16 BF16",
    "Expand": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "EyeLike": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Flatten": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Floor": "FP32 FP16 BF16",
    "GRU": "FP32 FP16 BF16",
    "Gather": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherElements": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "GatherND": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Gelu": "FP32 FP16 BF16 INT8 INT32 INT64",
    "Gemm": "FP32 FP16 BF16",
    "GlobalAveragePool": "FP32 FP16 BF16",
    "GlobalLpPool": "FP32 FP16 BF16",
    "GlobalMaxPool": "FP32 FP16 BF16",
    "Greater": "FP32 FP16 BF16 INT32 INT64",
    "GreaterOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "GridSample": "FP32 FP16",
    "GroupNormalization": "FP32 FP16 BF16",
    "HardSigmoid": "FP32 FP16 BF16",
    "HardSwish": "FP32 FP16 BF16",
    "Hardmax": "FP32 FP16 BF16",
    "Identity": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "If": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "ImageScaler": "FP32 FP16 BF16",
    "InstanceNormalization": "FP32 FP16 BF16",
    "IsInf": "FP32 FP16 BF16",
    "IsNaN": "FP32 FP16 BF16 INT32 INT64",
    "LRN": "FP32 FP16 BF16",
    "LSTM": "FP32 FP16 BF16",
    "LayerNormalization": "FP32 FP16 BF16",
    "LeakyRelu": "FP32 FP16 BF16",
    "Less": "FP32 FP16 BF16 INT32 INT64",
    "LessOrEqual": "FP32 FP16 BF16 INT32 INT64",
    "Log": "FP32 FP16 BF16",
    "LogSoftmax": "FP32 FP16 BF16",
    "Loop": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "LpNormalization": "FP32 FP16 BF16",
    "LpPool": "FP32 FP16 BF16",
    "MatMul": "FP32 FP16 BF16",
    "Max": "FP32 FP16 BF16 INT32 INT64",
    "MaxPool": "FP32 FP16 BF16",
    "Mean": "FP32 FP16 BF16 FP8 INT32 INT64",
    "MeanVarianceNormalization": "FP32 FP16 BF16",
    "Min": "FP32 FP16 BF16 INT32 INT64",
    "Mish": "FP32 FP16",
    "Mod": "FP32 FP16 BF16 INT32 INT64",
    "Mul": "FP32 FP16 BF16 INT32 INT64",
    "Neg": "FP32 FP16 BF16 INT32 INT64",
    "NonMaxSuppression": "FP32 FP16",
    "NonZero": "FP32 FP16",
    "Not": "BOOL",
    "OneHot": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Or": "BOOL",
    "PRelu": "FP32 FP16 BF16",
    "Pad": "FP32 FP16 BF16 INT32 INT64",
    "ParametricSoftplus": "FP32 FP16 BF16",
    "Pow": "FP32 FP16 BF16",
    "QuantizeLinear": "FP32 FP16 BF16",
    "RNN": "FP32 FP16 BF16",
    "RandomNormal": "FP32 FP16 BF16",
    "RandomNormalLike": "FP32 FP16 BF16",
    "RandomUniform": "FP32 FP16 BF16",
    "RandomUniformLike": "FP32 FP16 BF16",
    "Range": "FP32 FP16 BF16 INT32 INT64",
    "Reciprocal": "FP32 FP16 BF16",
    "ReduceL1": "FP32 FP16 BF16 INT32 INT64",
    "ReduceL2": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceLogSumExp": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMax": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMean": "FP32 FP16 BF16 INT32 INT64",
    "ReduceMin": "FP32 FP16 BF16 INT32 INT64",
    "ReduceProd": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSum": "FP32 FP16 BF16 INT32 INT64",
    "ReduceSumSquare": "FP32 FP16 BF16 INT32 INT64",
    "Relu": "FP32 FP16 BF16 INT32 INT64",
    "Reshape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Resize": "FP32 FP16 BF16",
    "ReverseSequence": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "RoiAlign": "FP32 FP16",
    "Round": "FP32 FP16 BF16",
    "ScaledTanh": "FP32 FP16 BF16",
    "Scan": "FP32 FP16 BF16",
    "Scatter": "FP32 FP16 BF16 INT32 INT64",
    "ScatterElements": "FP32 FP16 BF16 INT32 INT64",
    "ScatterND": "FP32 FP16 BF16 INT32 INT64",
    "Selu": "FP32 FP16 BF16",
    "Shape": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Shrink": "FP32 FP16 BF16 INT32 INT64",
    "Sigmoid": "FP32 FP16 BF16",
    "Sign": "FP32 FP16 BF16 INT32 INT64",
    "Sin": "FP32 FP16 BF16",
    "Sinh": "FP32 FP16 BF16",
    "Size": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Slice": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Softmax": "FP32 FP16 BF16",
    "Softplus": "FP32 FP16 BF16",
    "Softsign": "FP32 FP16 BF16",
    "SpaceToDepth": "FP32 FP16 BF16 INT32 INT64",
    "Split": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sqrt": "FP32 FP16 BF16",
    "Squeeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Sub": "FP32 FP16 BF16 INT32 INT64",
    "Sum": "FP32 FP16 BF16 INT32 INT64",
    "Tan": "FP32 FP16 BF16",
    "Tanh": "FP32 FP16 BF16",
    "ThresholdedRelu": "FP32 FP16 BF16",
    "Tile": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "TopK": "FP32 FP16 BF16 INT32 INT64",
    "Transpose": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Trilu": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Unsqueeze": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Upsample": "FP32 FP16 BF16",
    "Where": "FP32 FP16 BF16 INT32 INT64 BOOL",
    "Xor": "BOOL",
}
UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow CenterCropPad Col2Im
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow ImageDecoder
MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())


def _types(model) -> typing.Dict[str, int]:
    """Element type of every named value in the graph and its subgraphs (after shape inference)."""
    types: typing.Dict[str, int] = {}

    def visit(graph):
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type"):
                types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    visit(sub)

    visit(model.graph)
    return types


def _constants(graph, outer: typing.Set[str]) -> typing.Set[str]:
    return outer | {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def constant_value(graph_stack, name: str):
    """The value of `name` when an initializer or a Constant node of the graphs (innermost first) holds it."""
    from onnx import numpy_helper

    for graph in graph_stack:
        for t in graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for n in graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                return numpy_helper.to_array(n.attribute[0].t)
    return None


def _node_problems(node, types, constants, graph_stack) -> typing.List[str]:
    op, where = node.op_type, f"{node.op_type} node {node.name or node.output[0]!r}"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: operator of domain {node.domain!r} is not ONNX standard (TensorRT cannot parse it; "
                f"graphs with MatMulNBits are ONNX Runtime only)"]
    if op in UNSUPPORTED or op not in SUPPORTED_TYPES:
        return [f"{where}: not supported by TensorRT's ONNX parser"]
    allowed = set(SUPPORTED_TYPES[op].split())
    checked = list(node.input) if op in ALL_INPUTS else list(node.input[1:3]) if op == "Where" else list(node.input[:1])
    problems = []
    for name in filter(None, checked):
        kind = ONNX_TYPE_NAMES.get(types.get(name), f"type {types.get(name)}") if name in types else "an unknown type"
        if kind == "UINT8" and op != "Cast":
            kind = "UINT8 (TensorRT: network inputs/outputs only)"
        if kind not in allowed:
            problems.append(f"{where}: input {name!r} is {kind}; TensorRT supports {op} on {', '.join(sorted(allowed))}")
    if op == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if ONNX_TYPE_NAMES.get(to) not in allowed:
            problems.append(f"{where}: casts to {ONNX_TYPE_NAMES.get(to, to)}, which TensorRT does not support")
    index = CONSTANT_INPUTS.get(op)
    if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
        problems.append(f"{where}: input {index} ({node.input[index]!r}) must be an initializer for TensorRT"
                        if op != "TopK" else f"{where}: K is computed in the graph; TensorRT needs K < {TOPK_MAX_K + 1}, "
                        "which only a constant K can be checked against")
    if op == "TopK":
        problems += _topk_problems(node, where, graph_stack)
    return problems


def _topk_problems(node, where, graph_stack) -> typing.List[str]:
    problems = []
    if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
        problems.append(f"{where}: TensorRT needs sorted=1")
    k = constant_value(graph_stack, node.input[1])
    if k is not None and int(k.reshape(-1)[0]) > TOPK_MAX_K:
        problems.append(f"{where}: K = {int(k.reshape(-1)[0])}; TensorRT's TopK needs K < {TOPK_MAX_K + 1}")
    return problems


def _inferred(model):
    """The model with every value's type inferred; as it is when inference cannot run (an
    operator of an unknown domain: the check reports that operator anyway)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return model


def check_model(model) -> typing.List[str]:
    """Problems of an ONNX model (a ModelProto or a path) for TensorRT 10; empty when none."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inferred = _inferred(model)
    types = _types(inferred)
    problems = [f"the graph uses opset {o.version}; TensorRT 10 reads opsets 9 to 20"
                for o in model.opset_import if o.domain in ("", "ai.onnx") and not 9 <= o.version <= 20]

    def visit(graph, outer, stack):
        constants = _constants(graph, outer)
        stack = [graph] + stack
        for node in graph.node:
            problems.extend(_node_problems(node, types, constants, stack))
            for attr in node.attribute:
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    visit(sub, constants, stack)

    visit(inferred.graph, set(), [])
    return problems
