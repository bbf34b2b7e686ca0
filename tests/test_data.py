"""TokenPairs validation, file formats and batch adapters (acdc_viz.data)."""

from __future__ import annotations

import json
import pickle
from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch
from safetensors.torch import save_file

from acdc_viz.data import (
    DataError,
    TokenPairs,
    load_token_pairs,
    random_token_pairs,
    save_token_pairs,
)


def ids(*rows: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=dtype)


CLEAN = ids([1, 2, 3], [4, 5, 6])
CORRUPT = ids([7, 8, 9], [1, 1, 1])


# --- construction and validation -------------------------------------------------------------


def test_valid_pairs_are_int64_with_shape_properties():
    pairs = TokenPairs(CLEAN.int(), CORRUPT.int())
    assert pairs.clean.dtype == pairs.corrupt.dtype == torch.int64
    assert (pairs.batch_size, pairs.seq_len) == (2, 3)
    assert torch.equal(pairs.clean, CLEAN)
    with pytest.raises(FrozenInstanceError):
        pairs.clean = CORRUPT  # type: ignore[misc]


def test_to_device_returns_a_copy_on_that_device():
    moved = TokenPairs(CLEAN, CORRUPT).to("cpu")
    assert isinstance(moved, TokenPairs)
    assert moved.clean.device.type == "cpu"
    assert torch.equal(moved.corrupt, CORRUPT)


@pytest.mark.parametrize(
    ("clean", "corrupt", "expected"),
    [
        (CLEAN, ids([1, 2], [3, 4]), r"same shape.*\(2, 3\) vs \(2, 2\)"),
        (CLEAN, CORRUPT.int(), r"different dtypes.*int64.*int32"),
        (CLEAN.float(), CORRUPT.float(), r"must be integers.*float32"),
        (CLEAN.bool(), CORRUPT.bool(), r"must be integers.*bool"),
        (torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3, dtype=torch.int64), "empty"),
        (torch.empty(2, 0, dtype=torch.int64), torch.empty(2, 0, dtype=torch.int64), "empty"),
        (torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), r"2-D.*1-D.*unsqueeze"),
        (torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(1, 2, 3, dtype=torch.int64), "3-D"),
        (CLEAN, ids([7, 8, 9], [1, -100, 1]), r"corrupt holds a negative token id \(-100\)"),
        ([[1, 2]], CORRUPT, r"clean must be a torch.Tensor.*got list.*torch.tensor"),
    ],
)
def test_bad_pairs_raise_data_error(clean, corrupt, expected):
    with pytest.raises(DataError, match=expected):
        TokenPairs(clean, corrupt)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_check_vocab_names_the_largest_id():
    pairs = TokenPairs(CLEAN, ids([7, 8, 42], [1, 1, 1]))
    pairs.check_vocab(43)
    with pytest.raises(DataError, match=r"corrupt holds token id 42.*only 10 tokens"):
        pairs.check_vocab(10)


def test_random_token_pairs_are_seeded_and_in_range():
    a = random_token_pairs(5, 7, 20, seed=3)
    b = random_token_pairs(5, 7, 20, seed=3)
    c = random_token_pairs(5, 7, 20, seed=4)
    assert (a.batch_size, a.seq_len) == (5, 7)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert not torch.equal(a.clean, c.clean)
    assert not torch.equal(a.clean, a.corrupt)
    a.check_vocab(20)
    with pytest.raises(DataError, match="n >= 1"):
        random_token_pairs(0, 7, 20, seed=0)


# --- batch adapters --------------------------------------------------------------------------


@dataclass
class PromptPairBatch:
    """The shape of auto-circuit's batch: attributes .clean and .corrupt (plus others)."""

    key: int
    clean: torch.Tensor
    corrupt: torch.Tensor


@pytest.mark.parametrize(
    "batch",
    [
        PromptPairBatch(0, CLEAN, CORRUPT),
        {"clean": CLEAN, "corrupt": CORRUPT, "answers": None},
        (CLEAN, CORRUPT),
        [CLEAN, CORRUPT],
    ],
    ids=["PromptPairBatch", "dict", "tuple", "list"],
)
def test_from_batch_accepts_the_common_containers(batch):
    pairs = TokenPairs.from_batch(batch)
    assert torch.equal(pairs.clean, CLEAN) and torch.equal(pairs.corrupt, CORRUPT)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({"clean": CLEAN}, r"missing \['corrupt'\]"),
        ((CLEAN, CORRUPT, CLEAN), r"\(clean, corrupt\), got 3 items"),
        (CLEAN, r"cannot read token pairs from a Tensor"),
    ],
)
def test_from_batch_rejects_other_containers(batch, expected):
    with pytest.raises(DataError, match=expected):
        TokenPairs.from_batch(batch)


def test_from_dataloader_uses_the_first_batch_only():
    from torch.utils.data import DataLoader

    data = random_token_pairs(6, 4, 30, seed=0)
    rows = [{"clean": data.clean[i], "corrupt": data.corrupt[i]} for i in range(6)]
    pairs = TokenPairs.from_dataloader(DataLoader(rows, batch_size=4, shuffle=False))
    assert pairs.batch_size == 4
    assert torch.equal(pairs.clean, data.clean[:4])
    assert torch.equal(pairs.corrupt, data.corrupt[:4])


def test_from_dataloader_rejects_an_empty_loader():
    from torch.utils.data import DataLoader

    with pytest.raises(DataError, match="no batches"):
        TokenPairs.from_dataloader(DataLoader([], batch_size=2))


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix):
    pairs = random_token_pairs(3, 5, 1000, seed=1)
    path = save_token_pairs(pairs, tmp_path / f"pairs{suffix}")
    loaded = load_token_pairs(path)
    assert torch.equal(loaded.clean, pairs.clean) and torch.equal(loaded.corrupt, pairs.corrupt)
    assert loaded.clean.dtype == torch.int64


def test_hand_written_json_loads(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"clean": [[1, 2], [3, 4]], "corrupt": [[5, 6], [7, 8]]}))
    pairs = load_token_pairs(str(path))
    assert pairs.clean.tolist() == [[1, 2], [3, 4]]


def test_int32_safetensors_load_as_int64(tmp_path):
    path = tmp_path / "pairs.safetensors"
    save_file({"clean": CLEAN.int(), "corrupt": CORRUPT.int(), "labels": torch.ones(2)}, path)
    assert load_token_pairs(path).clean.dtype == torch.int64


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "ragged.json",
            {"clean": [[1, 2, 3], [4, 5]], "corrupt": [[1, 2, 3], [4, 5, 6]]},
            r'"clean" rows must have equal length.*row 0 has 3.*row 1 has 2',
        ),
        (
            "floats.json",
            {"clean": [[1, 2.5]], "corrupt": [[1, 2]]},
            r'"clean"\[0\]\[1\] is 2.5; token ids must be integers',
        ),
        ("strings.json", {"clean": [["a"]], "corrupt": [[1]]}, "must be integers"),
        ("bools.json", {"clean": [[True]], "corrupt": [[1]]}, "must be integers"),
        ("flat.json", {"clean": [1, 2], "corrupt": [3, 4]}, r"row 0 is int, expected a list"),
        ("nokey.json", {"clean": [[1]]}, r'keys "clean" and "corrupt".*found \[\'clean\'\]'),
        ("list.json", [[1, 2]], r'keys "clean" and "corrupt".*found list'),
        ("empty_rows.json", {"clean": [], "corrupt": []}, "non-empty list"),
        (
            "shapes.json",
            {"clean": [[1, 2]], "corrupt": [[1, 2, 3]]},
            r"same shape.*\(1, 2\) vs \(1, 3\)",
        ),
        ("negative.json", {"clean": [[1, -1]], "corrupt": [[1, 2]]}, "negative token id"),
        ("truncated.json", '{"clean": [[1, 2], [3', r"not valid JSON.*truncated"),
        ("binary.json", b"\xff\xfe\x00garbage", "cannot read it as UTF-8"),
        ("garbage.safetensors", b"definitely not a safetensors file", "not a readable safetensors"),
        ("empty.safetensors", b"", "not a readable safetensors"),
        ("garbage.pt", b"garbage", r"torch.load\(weights_only=True\)"),
        ("unknown.csv", "1,2,3", r"unknown token-pair file format '\.csv'.*\.json.*\.safetensors"),
        ("nosuffix", "x", r"\(no suffix\)"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=expected) as info:
        load_token_pairs(path)
    assert str(path) in str(info.value)


def test_truncated_safetensors(tmp_path):
    good = save_token_pairs(random_token_pairs(4, 8, 100, seed=0), tmp_path / "good.safetensors")
    bad = write(tmp_path / "cut.safetensors", good.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{bad}.*not a readable safetensors"):
        load_token_pairs(bad)


def test_safetensors_with_wrong_tensor_names(tmp_path):
    path = tmp_path / "names.safetensors"
    save_file({"clean_ids": CLEAN, "corrupt_ids": CORRUPT}, path)
    with pytest.raises(DataError, match=r"missing \['clean', 'corrupt'\].*clean_ids"):
        load_token_pairs(path)


def test_pt_must_hold_a_dict_of_tensors(tmp_path):
    path = tmp_path / "tuple.pt"
    torch.save((CLEAN, CORRUPT), path)
    with pytest.raises(DataError, match="holds a tuple, expected a dict"):
        load_token_pairs(path)


class Payload:
    """Unpickling this would run code; load_token_pairs must refuse it."""

    def __reduce__(self):
        return (pytest.fail, ("load_token_pairs unpickled an arbitrary object",))


def test_pt_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"clean": Payload(), "corrupt": CORRUPT}, path)
    with pytest.raises(DataError, match=r"weights_only=True.*refused"):
        load_token_pairs(path)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"clean": Payload()}))
    with pytest.raises(DataError, match="weights_only=True"):
        load_token_pairs(plain)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        load_token_pairs(tmp_path / "nope.json")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(DataError, match="is not a file"):
        load_token_pairs(folder)


def test_save_rejects_unknown_suffix_and_non_pairs(tmp_path):
    with pytest.raises(DataError, match="unknown token-pair file format"):
        save_token_pairs(TokenPairs(CLEAN, CORRUPT), tmp_path / "pairs.txt")
    with pytest.raises(DataError, match="expects a TokenPairs"):
        save_token_pairs((CLEAN, CORRUPT), tmp_path / "pairs.json")  # type: ignore[arg-type]
