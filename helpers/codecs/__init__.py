"""What crosses the network: codecs turn a dict of tensors into bytes and back.

``len(codec.encode(tensors))`` *is* the communication cost. Three files, one job each:

* :mod:`~helpers.codecs.format`: the checked binary layout (header, shapes, dtypes, CRC-32; never
  pickle), the float32/float16 codecs and :func:`validate_update` (codec ids 0-1);
* :mod:`~helpers.codecs.quantized`: uniform ``b``-bit codes, bit-packed (Chapter 2; ids 2-9);
* :mod:`~helpers.codecs.sparse`: sparse and top-k codecs (Chapter 3; ids 10-19).

Ids 20-29 are reserved for logit codecs.
"""

from .format import MAGIC, Codec, Float16Codec, Float32Codec, PayloadError, validate_update
from .quantized import PackedIntCodec, QATUploadCodec, QuantizedCodec, lsq_weight_steps
from .sparse import (LAYOUTS, SparseCodec, TopKCodec, binary_entropy, decode_positions, encode_positions,
                     position_entropy_bits, varint_decode, varint_encode)

__all__ = ["MAGIC", "Codec", "Float16Codec", "Float32Codec", "PayloadError", "validate_update",
           "PackedIntCodec", "QATUploadCodec", "QuantizedCodec", "lsq_weight_steps", "LAYOUTS", "SparseCodec", "TopKCodec", "binary_entropy",
           "decode_positions", "encode_positions", "position_entropy_bits", "varint_decode", "varint_encode"]
