"""Reading a frame's header from untrusted bytes: every field within its own caps, enforced while
msgpack builds it.

A header is read field by field. Each value gets a window of the header no longer than the field
can need within the limits (:func:`mobiflower.platform.frames._format.field_caps`), and msgpack builds
it with that field's bounds on strings, arrays and maps (and, through its hooks, on how many maps
and arrays, how deep, and no key twice). So whatever a header holds, decoding it builds at most a
few objects per byte of those windows.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

import msgpack

from mobiflower.platform.frames._checks import check_version
from mobiflower.platform.frames._format import (
    FRAME_VERSION,
    HEADER_FIELDS,
    SHORT_STR,
    TARGET_FIELDS,
    FieldCaps,
    FrameError,
    FrameLimits,
    field_caps,
    free_caps,
)


class _Hooks:
    """msgpack's hooks while it builds one field: strict maps, and the caps on maps and arrays."""

    def __init__(self, name: str, caps: FieldCaps):
        self.name = name
        self.caps = caps
        self.left = caps.containers
        self.levels: dict[int, int] = {}  # free-form content: nesting level of each map and array built

    def _built(self, obj: Any, children: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            if self.caps.containers == 1:
                raise FrameError(self.name, "must not hold maps or arrays inside it")
            raise FrameError(
                self.name,
                f"holds more than {self.caps.containers} maps and arrays, the most its layout allows within the limits",
            )
        if self.caps.depth is not None:
            level = 1 + max((self.levels.get(id(c), 0) for c in children), default=0)
            if level > self.caps.depth:
                raise FrameError(self.name, f"nests maps and arrays more than {self.caps.depth} deep, the limit")
            self.levels[id(obj)] = level
        return obj

    def array(self, items: list) -> list:
        return self._built(items, items)

    def map(self, pairs: list[tuple[Any, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise FrameError(
                    f"{self.name}.{key}" if isinstance(key, str) else self.name,
                    f"key {key!r} appears twice in one map; a frame must read the same to every reader",
                )
            out[key] = value
        return self._built(out, out.values())


_READ_SIZE = 1 << 14  # msgpack reads a field's window in pieces this size: no copy of a whole window


class _Window:
    """A read-only file over part of the header, for msgpack to read a field from."""

    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        chunk = bytes(self.view[self.pos : end])
        self.pos = end
        return chunk


def _unpack(raw: memoryview, pos: int, caps: FieldCaps, name: str) -> tuple[Any, int]:
    """The msgpack value at ``raw[pos:]``, built within ``caps``; returns it and the position after it."""
    window = _Window(raw[pos : pos + caps.nbytes])
    hooks = _Hooks(name, caps)
    unpacker = msgpack.Unpacker(
        window,
        read_size=min(_READ_SIZE, max(1, len(window.view))),
        max_buffer_size=max(1, len(window.view)),
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=caps.str_len,
        max_bin_len=caps.bin_len,
        max_array_len=caps.array_len,
        max_map_len=caps.map_len,
        max_ext_len=0,
        list_hook=hooks.array,
        object_pairs_hook=hooks.map,
    )
    error = None
    try:
        value = unpacker.unpack()
    except FrameError as err:
        error = FrameError(err.field, err.message)
    except msgpack.OutOfData:
        if len(window.view) < caps.nbytes:
            error = FrameError(name, "truncated: the header ends inside this field")
        else:
            error = FrameError(name, f"takes more than the {caps.nbytes} bytes of header the limits leave it")
    except Exception as exc:  # msgpack refused it: a bound exceeded, a bad type byte or UTF-8, nesting
        error = FrameError(name, f"not valid msgpack within the limits ({type(exc).__name__}: {exc})")
    if error is not None:
        del unpacker  # what it built so far goes now, not with the traceback of a refusal
        raise error
    return value, pos + unpacker.tell()


def _map_len(raw: memoryview, pos: int, name: str) -> tuple[int, int]:
    """The number of entries of the map at ``raw[pos:]`` and the position of its first key."""
    unpacker = msgpack.Unpacker(max_buffer_size=8)
    unpacker.feed(raw[pos : pos + 5])
    try:
        n = unpacker.read_map_header()
    except msgpack.OutOfData:
        raise FrameError(name, "truncated: the header ends inside this field") from None
    except Exception:  # another type
        raise FrameError(name, "must be a msgpack map") from None
    return n, pos + unpacker.tell()


def _key(raw: memoryview, pos: int, name: str) -> tuple[str, int]:
    key, pos = _unpack(raw, pos, FieldCaps(3 + SHORT_STR), name)
    if not isinstance(key, str):
        raise FrameError(name, f"keys must be strings, got {type(key).__name__}")
    return key, pos


def _read_free(raw: memoryview, pos: int, name: str, limits: FrameLimits, left: list[int]) -> tuple[Any, int]:
    """Free-form content within what is ``left`` of the byte budget meta and extra target keys share."""
    try:
        value, end = _unpack(raw, pos, free_caps(limits, left[0]), name)
    except FrameError as err:
        if "bytes of header the limits leave it" in err.message:
            raise FrameError(
                name,
                f"meta and the extra keys of targets take more than {limits.max_meta_bytes} bytes encoded, the limit",
            ) from None
        raise
    left[0] -= end - pos
    return value, end


def _read_targets(
    raw: memoryview, pos: int, caps: dict[str, FieldCaps], limits: FrameLimits, left: list[int]
) -> tuple[dict[str, Any], int]:
    n, pos = _map_len(raw, pos, "targets")
    if n > len(TARGET_FIELDS) + limits.max_meta_keys:
        raise FrameError(
            "targets",
            f"has {n} keys, more than its {len(TARGET_FIELDS)} fields and {limits.max_meta_keys} others (the limit)",
        )
    targets: dict[str, Any] = {}
    for _ in range(n):
        key, pos = _key(raw, pos, "targets")
        name = f"targets.{key}"
        if key in targets:
            raise FrameError(name, "appears twice in targets; a frame must read the same to every reader")
        if key in TARGET_FIELDS:
            targets[key], pos = _unpack(raw, pos, caps[name], name)
        else:
            targets[key], pos = _read_free(raw, pos, name, limits, left)
    return targets, pos


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while msgpack builds a header: the many small containers it may
    build would start a pass over every object of the process (long in a server holding a model),
    for objects that cannot form cycles. Only the thread that paused it resumes it."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def read_header(raw: memoryview, limits: FrameLimits) -> dict[str, Any]:
    """The header map, each field built within its caps; a repeated or unknown field is refused."""
    with _gc_paused():
        return _read_fields(raw, limits)


def _read_fields(raw: memoryview, limits: FrameLimits) -> dict[str, Any]:
    caps = field_caps(limits)
    left = [limits.max_meta_bytes]  # free-form bytes left, shared by meta and the extra target keys
    n, pos = _map_len(raw, 0, "header")
    header: dict[str, Any] = {}
    for _ in range(n):
        key, pos = _key(raw, pos, "header")
        if key in header:
            raise FrameError(key, "appears twice in the header; a frame must read the same to every reader")
        if key not in HEADER_FIELDS:
            raise FrameError(key, f"unknown header field for frame version {header.get('version', FRAME_VERSION)}")
        if key == "targets":
            header[key], pos = _read_targets(raw, pos, caps, limits, left)
        elif key == "meta":
            header[key], pos = _read_free(raw, pos, key, limits, left)
        else:
            header[key], pos = _unpack(raw, pos, caps[key], key)
        if key == "version":  # a newer frame is named as such before its new fields are
            check_version(header[key])
    if pos != len(raw):
        raise FrameError("header", f"{len(raw) - pos} bytes follow the header map; frame corrupted")
    return header


__all__ = ["read_header"]
