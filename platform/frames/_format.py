"""What an activation frame may hold: its version, fields and vocabularies, the error that names
a field, and the limits a frame must respect with the header bytes they allow each field.

The wire layout itself is described in :mod:`mobiflower.platform.frames`, the public entry point;
this module is what the validation (:mod:`mobiflower.platform.frames._checks`) and the bounded header
reader (:mod:`mobiflower.platform.frames._header`) share.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TOKEN_POLICIES = ("all", "nonpad", "last")
TARGET_KINDS = ("class", "tokens", "none")
MAGIC = b"MBFL"
IGNORE_INDEX = -100  # token targets: position not used by the loss
MAX_FINGERPRINT_LEN = 1024

HEADER_FIELDS = (
    "version",
    "fingerprint",
    "layers",
    "token_policy",
    "sample_ids",
    "token_counts",
    "seq_lengths",
    "targets",
    "meta",
    "payload_bytes",
    "tensors",
)
# the header fields a Frame holds as they are sent (all but the version and the payload's layout)
FRAME_FIELDS = ("fingerprint", "layers", "token_policy", "sample_ids", "token_counts", "seq_lengths", "targets", "meta")
TENSOR_FIELDS = ("bits", "group_size", "rotation", "seed", "shape", "packed", "scales")
TARGET_FIELDS = ("kind", "values", "num_classes", "vocab_size")  # any other key is free-form content
# What a FrameError's ``field`` is made of, list indices written ``[i]``. A field the frame names
# itself (an unknown key, a key of meta given twice) is not among these.
FIELD_NAMES = frozenset(
    (
        "data",
        "magic",
        "header_length",
        "header",
        "crc",
        "frame",
        "activations",
        *HEADER_FIELDS,
        *(f"targets.{k}" for k in TARGET_FIELDS),
        *(f"tensors.{k}" for k in TENSOR_FIELDS),
        "layers[i]",
        *(f"layers[i].{k}" for k in TENSOR_FIELDS),
    )
)


class FrameError(ValueError):
    """A frame that must be rejected; ``.field`` names the offending header field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable across processes (Ray actors, multiprocessing)
        return (type(self), (self.field, self.message))


@dataclass(frozen=True)
class FrameLimits:
    """Upper bounds a frame must respect; decoding never allocates beyond them."""

    max_bytes: int = 1 << 30  # whole encoded frame
    max_samples: int = 65536
    max_layers: int = 256
    max_hidden: int = 65536
    max_tokens: int = 1 << 22  # rows of each activation (sum of token_counts)
    # free-form header content: ``meta`` and the extra keys of ``targets``, together
    max_meta_bytes: int = 1 << 14  # encoded size
    max_meta_keys: int = 64  # keys of meta, and extra keys of targets
    max_meta_len: int = 256  # entries of any one map or array inside them
    max_meta_depth: int = 4  # nesting of maps and arrays (a map or array value itself is level 1)

    @property
    def max_header_bytes(self) -> int:
        """The longest header a frame within these limits can need (longer ones are refused unread)."""
        return max_header_bytes(self)


# Header bytes per field. A header is read field by field (mobiflower.platform.frames._header): each
# value gets a window of the header no longer than the field can need within the limits, and msgpack
# builds it with that field's bounds on strings, arrays and maps.

INT_BYTES = 9  # the longest msgpack integer
SHORT_STR = 64  # bytes of a key, a token policy or a rotation name


@dataclass(frozen=True)
class FieldCaps:
    """What msgpack may build for one header field: the bytes it may span, the longest string, binary,
    array and map, how many maps and arrays in all, and (free-form content) how deep they nest."""

    nbytes: int
    str_len: int = SHORT_STR
    bin_len: int = 0
    array_len: int = 0
    map_len: int = 0
    containers: int = 1
    depth: int | None = None


def _ints(n: int) -> FieldCaps:
    """A flat list of at most ``n`` integers."""
    return FieldCaps(5 + INT_BYTES * n, array_len=n)


def field_caps(limits: FrameLimits) -> dict[str, FieldCaps]:
    """The caps of every field but the free-form ones (``meta``, extra keys of ``targets``)."""
    column = 3 + SHORT_STR + 5  # a tensor column's key and list header
    entry = 3 * INT_BYTES + 3 + SHORT_STR + 3 * (1 + 2 * INT_BYTES)  # one layer's entry in every column
    return {
        "version": FieldCaps(INT_BYTES),
        "payload_bytes": FieldCaps(INT_BYTES),
        "fingerprint": FieldCaps(5 + 4 * MAX_FINGERPRINT_LEN, str_len=4 * MAX_FINGERPRINT_LEN),
        "token_policy": FieldCaps(3 + SHORT_STR),
        "layers": _ints(limits.max_layers),
        "sample_ids": _ints(limits.max_samples),
        "token_counts": _ints(limits.max_samples),
        "seq_lengths": _ints(limits.max_samples),
        "tensors": FieldCaps(
            5 + len(TENSOR_FIELDS) * column + limits.max_layers * entry,
            array_len=max(2, limits.max_layers),
            map_len=len(TENSOR_FIELDS) + 1,
            containers=1 + (len(TENSOR_FIELDS) + 1) * (1 + limits.max_layers),
        ),
        "targets.kind": FieldCaps(3 + SHORT_STR),
        "targets.values": _ints(max(limits.max_samples, limits.max_tokens)),
        "targets.num_classes": FieldCaps(INT_BYTES),
        "targets.vocab_size": FieldCaps(INT_BYTES),
    }


def free_caps(limits: FrameLimits, nbytes: int) -> FieldCaps:
    """Free-form content in what is left (``nbytes``) of the budget meta and extra target keys share."""
    longest = max(limits.max_meta_len, limits.max_meta_keys)
    return FieldCaps(
        nbytes,
        str_len=limits.max_meta_bytes,
        bin_len=limits.max_meta_bytes,
        array_len=longest,
        map_len=longest,
        containers=limits.max_meta_bytes,
        depth=limits.max_meta_depth,
    )


def max_header_bytes(limits: FrameLimits) -> int:
    """Largest header a frame within ``limits`` can need: every field at its caps, every key at its
    longest, and the free-form budget."""
    keys = (len(HEADER_FIELDS) + len(TARGET_FIELDS) + limits.max_meta_keys) * (3 + SHORT_STR)
    return 5 + keys + sum(c.nbytes for c in field_caps(limits).values()) + limits.max_meta_bytes


__all__ = [
    "FRAME_VERSION",
    "SUPPORTED_VERSIONS",
    "TOKEN_POLICIES",
    "TARGET_KINDS",
    "MAGIC",
    "IGNORE_INDEX",
    "HEADER_FIELDS",
    "FRAME_FIELDS",
    "TENSOR_FIELDS",
    "TARGET_FIELDS",
    "FIELD_NAMES",
    "MAX_FINGERPRINT_LEN",
    "INT_BYTES",
    "SHORT_STR",
    "FrameError",
    "FrameLimits",
    "FieldCaps",
    "field_caps",
    "free_caps",
    "max_header_bytes",
]
