"""TensorProto <-> numpy for the server, with the checks a public endpoint needs.

`tf.make_ndarray` trusts its input: a TensorProto claiming a [10^12] shape
makes it try to allocate terabytes, and a tensor_content of the wrong length
raises deep inside numpy.  Requests come from the network, so this module
decodes only the dtypes our signatures take (float32, int32/64, string),
checks the element count against the declared shape before allocating
anything, and raises `ServingError(INVALID_ARGUMENT)` naming the input.
Encoding outputs writes `tensor_content` directly (one copy, no per-value
Python objects).
"""
from __future__ import annotations

from typing import Optional

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2


class ServingError(Exception):
    """An error with the gRPC status code the client should get."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# DataType enum -> (numpy dtype, repeated field holding the values when tensor_content is empty).
_NUMERIC = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
}
_FROM_NUMPY = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.float64): types_pb2.DT_DOUBLE,
               np.dtype(np.int32): types_pb2.DT_INT32, np.dtype(np.int64): types_pb2.DT_INT64}


def dtype_name(dtype_enum: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype_enum)
    except ValueError:
        return f"<unknown dtype {dtype_enum}>"


def to_numpy(proto: tensor_pb2.TensorProto, name: str, max_elements: int) -> np.ndarray:
    """Decode one request tensor; raises ServingError(INVALID_ARGUMENT) on anything malformed."""
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"input {name!r}: the tensor shape has unknown rank")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise invalid(f"input {name!r}: negative dimension in shape {dims}")
    count = 1
    for d in dims:
        count *= d
        if count > max_elements:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"input {name!r}: shape {dims} holds more than {max_elements} values")
    if proto.dtype == types_pb2.DT_STRING:
        values = proto.string_val
        if len(values) != count:
            raise invalid(f"input {name!r}: shape {dims} needs {count} strings, got {len(values)}")
        return np.array(list(values), dtype=object).reshape(dims)
    if proto.dtype not in _NUMERIC:
        raise invalid(f"input {name!r}: unsupported dtype {dtype_name(proto.dtype)}")
    np_dtype, field = _NUMERIC[proto.dtype]
    if proto.tensor_content:
        expected = count * np.dtype(np_dtype).itemsize
        if len(proto.tensor_content) != expected:
            raise invalid(f"input {name!r}: tensor_content has {len(proto.tensor_content)} bytes, "
                          f"shape {dims} of {dtype_name(proto.dtype)} needs {expected}")
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(dims)
    values = getattr(proto, field)
    if len(values) == count:
        return np.asarray(values, dtype=np_dtype).reshape(dims)
    if len(values) == 1 and count > 1:
        # TensorFlow's own rule: a single value fills the whole tensor.
        return np.full(dims, values[0], dtype=np_dtype)
    raise invalid(f"input {name!r}: shape {dims} needs {count} values, got {len(values)}")


def to_proto(array: np.ndarray, out: Optional[tensor_pb2.TensorProto] = None) -> tensor_pb2.TensorProto:
    """Encode one output array (numeric via tensor_content, strings via string_val).

    With `out` (an empty TensorProto, e.g. `response.outputs[name]`), writes into it and returns it: no
    intermediate message to copy.
    """
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto() if out is None else out
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend([v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()])
        return proto
    dtype = _FROM_NUMPY.get(array.dtype)
    if dtype is None:
        array, dtype = array.astype(np.float32), types_pb2.DT_FLOAT
    proto.dtype = dtype
    proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


# tf.DType name -> DataType enum, for comparing a request with a signature.
def tf_dtype_enum(tf_dtype) -> int:
    return int(tf_dtype.as_datatype_enum)
