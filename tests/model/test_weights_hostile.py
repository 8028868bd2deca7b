"""Weights archives an attacker made: the TorchScript reader refuses each in one line, reads no memory beyond what the
file holds, inflates nothing beyond a bound, and changes nothing in the process. The pickles are assembled opcode by
opcode, as a crafted file is."""

from __future__ import annotations

import pickle
import tracemalloc
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import model.weights
from jobs.cli import app
from model.weights import load_state_dict_file


def val(value) -> bytes:
    """One value's opcodes (ints, bools, str, tuples of them), without protocol header or STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def tensor(key="0", numel=4, offset=0, size=(4,), stride=(1,), storage="FloatStorage") -> bytes:
    """`torch._utils._rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())`."""
    persistent = (pickle.MARK + val("storage") + glob("torch", storage) + val(key) + val("cpu") + val(numel)
                  + pickle.TUPLE + pickle.BINPERSID)
    hooks = glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (glob("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + persistent + val(offset) + val(size)
            + val(stride) + val(False) + hooks + pickle.TUPLE + pickle.REDUCE)


def module(entries: dict[str, bytes]) -> bytes:
    """A TorchScript module object whose attributes are `entries` (name -> the opcodes of its value)."""
    items = b"".join(val(name) + value for name, value in entries.items())
    return (pickle.PROTO + b"\x02" + glob("__torch__.model", "Module") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.BUILD + pickle.STOP)


def archive(path, data_pkl: bytes, storages: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as out:
        out.writestr("m/data.pkl", data_pkl)
        out.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        out.writestr("m/code/__torch__/model.py", "")
        for key, data in storages.items():
            out.writestr(f"m/data/{key}", data)
    return path


FOUR_FLOATS = torch.arange(4, dtype=torch.float32).numpy().tobytes()


def test_the_assembled_archive_reads_as_torch_writes_it(tmp_path):
    path = archive(tmp_path / "ok.pt", module({"w": tensor(), "b": tensor(size=(2, 2), stride=(2, 1))}),
                   {"0": FOUR_FLOATS})
    state = load_state_dict_file(path)
    assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and state["b"].tolist() == [[0.0, 1.0], [2.0, 3.0]]


@pytest.mark.parametrize(("entries", "storages", "reason"), [
    # BUILD on a rebuilt tensor reaches Tensor.__setstate__ -> set_(), which can grow a storage over freed memory
    ({"w": tensor() + pickle.EMPTY_DICT + pickle.BUILD}, {"0": FOUR_FLOATS}, "sets the state of a Tensor"),
    ({"w": tensor(key="1", numel=0, size=(0,)) + val((1 << 20,)) + pickle.BUILD}, {"1": b""},
     "sets the state of a Tensor"),
    # zero strides: a 2^20 x 2^20 tensor over 4 floats
    ({"w": tensor(size=(1 << 20, 1 << 20), stride=(0, 0))}, {"0": FOUR_FLOATS}, "zero stride"),
    ({"w": tensor(offset=-2)}, {"0": FOUR_FLOATS}, "negative"),
    ({"w": tensor(size=(8,))}, {"0": FOUR_FLOATS}, "a tensor of 8 elements over a storage of 4"),
    ({"w": tensor(size=(2, 2), stride=(3, 1))}, {"0": FOUR_FLOATS}, "out of bounds"),
    # a huge declared element count over a 16-byte entry
    ({"w": tensor(numel=1 << 40)}, {"0": FOUR_FLOATS}, "storage 0: 16 bytes for 1099511627776"),
    # one storage declared with two sizes by the tensors that share it
    ({"w": tensor(), "v": tensor(numel=2, size=(2,))}, {"0": FOUR_FLOATS}, "storage 0 declared with 4 and 2"),
    ({"w": tensor(key="7")}, {"0": FOUR_FLOATS}, "storage 7 is not in the archive"),
    ({"w": val(("storage",)) + pickle.BINPERSID}, {}, "unexpected persistent id"),
    ({"w": tensor(size=(4.0,))}, {"0": FOUR_FLOATS}, "not what torch writes"),
])
def test_a_crafted_archive_is_refused_in_one_line(tmp_path, entries, storages, reason):
    path = archive(tmp_path / "crafted.pt", module(entries), storages)
    with pytest.raises(ValueError) as refused:
        load_state_dict_file(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: TorchScript archive whose tensors cannot be read") and "\n" not in message
    assert reason in message, message


def test_state_given_to_an_allowed_global_changes_nothing_in_the_process(tmp_path):
    defaults = model.weights._rebuild_tensor.__defaults__
    poison = glob("torch._utils", "_rebuild_tensor_v2") + val({"__defaults__": (1, 2)}) + pickle.BUILD
    path = archive(tmp_path / "crafted.pt", module({"w": poison}), {})
    with pytest.raises(ValueError, match="sets the state of a function"):
        load_state_dict_file(path)
    assert model.weights._rebuild_tensor.__defaults__ == defaults


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    numel = 64 << 20  # 256 MB of zeros, a few hundred KB deflated
    path = archive(tmp_path / "bomb.pt", module({"w": tensor(numel=numel, size=(numel,))}),
                   {"0": bytes(4 * numel)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 4 times the archive's size"):
            load_state_dict_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # nothing of the 256 MB was inflated


def test_weights_convert_refuses_a_crafted_archive_with_one_line_and_writes_nothing(tmp_path):
    path = archive(tmp_path / "crafted.pt", module({"w": tensor(key="1", numel=0, size=(0,)) + val((4096,))
                                                    + pickle.BUILD}), {"1": b""})
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["weights", "convert", str(path), str(out)])
    assert result.exit_code == 1 and not out.exists(), result.output
    assert result.output.count("\n") == 1 and "sets the state of a Tensor" in result.output


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_of_an_archive_ends_in_a_value_error_or_tensors_inside_the_file(tmp_path, data):
    """Bytes of a valid archive's pickle and storage flipped, cut or inserted: the reader returns tensors no larger
    than the file, or raises ValueError; never another exception, never memory from elsewhere."""
    pickled = bytearray(module({"w": tensor(), "b": tensor(size=(2, 2), stride=(2, 1))}))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(pickled) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            pickled[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del pickled[at:at + data.draw(st.integers(1, 8))]
        else:
            pickled[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    storage = data.draw(st.sampled_from([FOUR_FLOATS, FOUR_FLOATS[:8], b"", bytes(64)]))
    path = archive(tmp_path / "mutated.pt", bytes(pickled), {"0": storage})
    try:
        state = load_state_dict_file(path)
    except ValueError:
        return
    for value in state.values():
        assert value.untyped_storage().nbytes() <= max(len(storage), 16)
