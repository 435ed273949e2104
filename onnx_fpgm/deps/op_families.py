"""Op families that several stages name: the recurrent layers, the QOperator layers, the
fused attention ops that keep a KV cache, and the unary elementwise ops (their handler, and
``same_dims``: an output dim that copies the input's).

They live here, at the lowest stage that needs them (the analysis and the handlers), so the
oracle (``oracle.masking``), the cost model and the report read the same sets.
"""
from __future__ import annotations

#: The recurrent ops (the oracle and the cost model read ``W`` of these on ``FEATURE_AXIS``).
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: Gate blocks stacked in a recurrent op's W and R rows (its B holds twice as many).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: Axis of a recurrent op's X (and of its W) that holds the input features.
FEATURE_AXIS = 2
#: QOperator/integer layer ops (no handler): named in the report even when no channel of ours
#: reaches them. QDQ layers are float ops over DequantizeLinear and are pruned like float ones.
QUANTIZED_LAYERS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                              "QGemm", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                              "MatMulIntegerToFloat", "QAttention", "QLinearConvTranspose"})
#: Fused attention ops that read a past key/value cache and write the present one:
#: (op, domain) -> ((past input index, present output index), ...). The caches are
#: (batch, heads, sequence, head_dim): their sequence axis is ``CACHE_SEQUENCE_AXIS``.
CACHE_ATTENTION = {("GroupQueryAttention", "com.microsoft"): ((3, 1), (4, 2)),
                   ("MultiHeadAttention", "com.microsoft"): ((6, 1), (7, 2)),
                   ("Attention", ""): ((4, 1), (5, 2))}
CACHE_SEQUENCE_AXIS = 2

#: Unary elementwise ops: one input carries the channels (the others are scalars).
UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Swish",
    "Not", "IsNaN", "IsInf",
)
#: Unary ops that do not change values: a BatchNorm after them still folds into the producer.
VALUE_PRESERVING = ("Identity", "Dropout", "Cast")
