"""What keeps the device lean: embedding rows read from the file, dequantization in tiles, forward
pieces bounded in tokens, and a tokenizer dropped once the device's data is tokenized."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mobiflower.platform.quantized_layers as quantized_layers
from mobiflower.clients.device_setup import DeviceSetup, DeviceSetupError
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize
from mobiflower.platform.data import Example
from mobiflower.platform.file_rows import FileRows, tensor_locations
from mobiflower.platform.prepared_weights import WEIGHTS_FILE, ensure_prepared, load_prepared_backbone
from mobiflower.platform.quantized_layers import Int4Linear, Int8Linear

TEXTS = [
    "a gripping, beautiful film",
    "two hours I will never get back",
    "fine",
    "an odd, long, winding story",
    "not bad at all",
    "the plot, sadly, goes nowhere and takes its time getting there",
]
EXAMPLES = [Example(i, t, i % 2) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def prepared(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return {p: ensure_prepared(tiny_llama, p, out) for p in ("fp32", "int8", "int4")}


def _taps(backbone: Backbone, texts=TEXTS) -> dict[int, torch.Tensor]:
    enc = backbone.tokenize(texts)
    seen: dict[int, torch.Tensor] = {}
    backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h.clone()))
    return seen


# ---- embedding rows read from the file -----------------------------------------------------------

_SAFETENSORS_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 7), st.integers(1, 9), st.sampled_from(_SAFETENSORS_DTYPES)), min_size=1, max_size=5
    ),
    st.integers(0, 2**31 - 1),
)
def test_tensor_locations_find_every_tensors_bytes(tmp_path_factory, shapes, seed):
    """Property: for any set of 2-D tensors saved with safetensors, the located bytes read back
    (row by row, with FileRows) equal the tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (rows, dim, dtype) in enumerate(shapes):
        t = torch.randn(rows, dim, generator=g) * 50
        tensors[f"t{i}.weight"] = t.to(dtype) if dtype != torch.int8 else t.clamp(-127, 127).to(torch.int8)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    located = tensor_locations(path)
    assert set(located) == set(tensors)
    for name, t in tensors.items():
        offset, dtype, shape = located[name]
        assert dtype == t.dtype and shape == tuple(t.shape)
        rows = FileRows(path, offset, dtype, shape)
        ids = torch.arange(t.shape[0] - 1, -1, -1)
        assert torch.equal(rows.read(ids), t[ids])
        assert torch.equal(rows.lookup(torch.tensor([[0, t.shape[0] - 1, 0]])), t[[0, t.shape[0] - 1, 0]][None])
        rows.close()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_prepared_embedding_reads_rows_from_the_file(prepared, precision):
    model, _, manifest = load_prepared_backbone(prepared[precision])
    assert manifest["embedding"] == "file rows"
    emb = model.get_input_embeddings()
    assert emb.file_rows is not None
    ids = torch.tensor([[5, 1, 5, 7], [0, 3, 2, 2]])
    from_file = emb(ids)
    rows = emb.file_rows
    for twin in (copy.deepcopy(rows), pickle.loads(pickle.dumps(rows))):  # each opens its own file
        assert twin._fd is None and torch.equal(twin.lookup(ids, getattr(emb, "scale", None)), from_file)
        twin.close()
    assert torch.equal(rows.lookup(ids, getattr(emb, "scale", None)), from_file)  # still open
    emb.file_rows = None  # the memory-mapped table, as before
    assert torch.equal(from_file, emb(ids))
    with pytest.raises(IndexError, match="outside"):
        FileRows(prepared[precision] / WEIGHTS_FILE, 0, torch.int8, (4, 2)).read(torch.tensor([9]))


def test_file_rows_keep_the_taps_bit_identical(prepared):
    backbone = Backbone.load(str(prepared["int8"]), num_taps=2)
    with_rows = _taps(backbone)
    backbone.model.get_input_embeddings().file_rows = None
    mapped = _taps(backbone)
    for layer in mapped:
        assert torch.equal(with_rows[layer], mapped[layer])


# ---- dequantization in tiles -----------------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [Int8Linear, Int4Linear])
def test_tiled_dequantization_matches_the_whole_weight(layer_cls, monkeypatch):
    w, b = torch.randn(100, 64), torch.randn(100)
    layer = layer_cls.from_float(w, b) if layer_cls is Int8Linear else layer_cls.from_float(w, b, group_size=16)
    x = torch.randn(3, 7, 64)
    ref = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    monkeypatch.setattr(quantized_layers, "DEQUANT_TILE_ELEMENTS", 64 * 30)  # 4 tiles of 25 rows
    quantized_layers.release_workspaces()
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    pool = quantized_layers._WORKSPACES.pool
    assert max(buf.numel() for (role, *_), buf in pool.items() if role == "w") == 25 * 64
    quantized_layers.release_workspaces()


# ---- forward pieces bounded in tokens ---------------------------------------------------------------


def test_pieces_respect_the_token_budget(tiny_llama):
    backbone = Backbone.load(tiny_llama, num_taps=2)
    runtime = DeviceRuntime(backbone)
    ids = [e.ids for e in runtime.encode_samples(EXAMPLES)]
    for budget in (1, 8, 20, 40, None):
        pieces = runtime._pieces(ids, budget)
        assert sum(len(mask) for _, mask in pieces) == len(ids)
        assert [int(n) for _, mask in pieces for n in mask.sum(dim=1)] == [len(x) for x in ids]
        for input_ids, mask in pieces:
            assert input_ids.shape == mask.shape and int(mask[:, -1].max()) == 1  # padded to its own longest
            assert budget is None or len(mask) == 1 or mask.numel() <= budget


@pytest.mark.parametrize("policy", ["last", "nonpad"])
def test_frames_do_not_depend_on_the_token_budget(prepared, policy):
    backbone = Backbone.load(str(prepared["fp32"]), num_taps=2)
    whole, _ = DeviceRuntime(backbone, ForwardConfig(token_policy=policy, max_tokens=None, bits=16)).make_frame(
        EXAMPLES
    )
    small, _ = DeviceRuntime(backbone, ForwardConfig(token_policy=policy, max_tokens=12, bits=16)).make_frame(EXAMPLES)
    assert (small.sample_ids, small.seq_lengths, small.token_counts) == (
        whole.sample_ids,
        whole.seq_lengths,
        whole.token_counts,
    )
    for a, b in zip(whole.activations, small.activations):
        torch.testing.assert_close(dequantize(a), dequantize(b), rtol=1e-3, atol=1e-3)


def test_max_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens=0"):
        ForwardConfig(max_tokens=0)
    assert ForwardConfig(max_tokens=None).max_tokens is None
    with pytest.raises(DeviceSetupError, match="max-tokens=-1"):
        DeviceSetup.from_configs({}, {"partition-id": 0, "num-partitions": 1, "max-tokens": -1})
    assert DeviceSetup.from_configs({}, {"partition-id": 0, "num-partitions": 1, "max-tokens": 64}).max_tokens == 64


# ---- the tokenizer, dropped once the data is tokenized ----------------------------------------------


def test_pretokenize_drops_the_tokenizer_and_frames_need_it_no_more(prepared):
    backbone = Backbone.load(str(prepared["int8"]), num_taps=2)
    reference, _ = DeviceRuntime(backbone).make_frame(EXAMPLES)
    runtime = DeviceRuntime(backbone)
    assert runtime.pretokenize(EXAMPLES) == len(TEXTS)
    assert backbone._tokenizer is None
    frame, _ = runtime.make_frame(EXAMPLES[::-1])
    assert backbone._tokenizer is None  # every text was cached
    # the same samples and lengths, whatever order they were asked in (a frame lists them by length)
    assert dict(zip(frame.sample_ids, frame.seq_lengths)) == dict(zip(reference.sample_ids, reference.seq_lengths))
    assert sorted(frame.sample_ids) == sorted(e.id for e in EXAMPLES)
    runtime.make_frame([Example(99, "a text it has not seen", 1)])  # loads the tokenizer again
    assert backbone._tokenizer is not None
    assert backbone.tokenize(["fine"])["input_ids"].shape[0] == 1


def test_a_tokenizer_that_cannot_be_reloaded_is_kept(tiny_llama):
    backbone = Backbone.load(tiny_llama, num_taps=2)  # loaded through transformers: no loader
    assert backbone.release_tokenizer() is False
    DeviceRuntime(backbone).pretokenize(EXAMPLES)
    assert backbone._tokenizer is not None


def test_a_device_may_choose_its_weight_precision():
    """A phone with little memory runs int8 although the run says fp32 (node config wins)."""
    node = {"partition-id": 0, "num-partitions": 1}
    assert DeviceSetup.from_configs({"weight-precision": "fp32"}, node).weights == "fp32"
    assert DeviceSetup.from_configs({"weight-precision": "fp32"}, {**node, "weight-precision": "w8"}).weights == "int8"
    with pytest.raises(DeviceSetupError, match="weight-precision='fp16'.*bf16"):
        DeviceSetup.from_configs({}, {**node, "weight-precision": "fp16"})
