"""tools/merge_datasets.py and tools/convert_nanogpt.py against megatron-core's reader."""

import os

import numpy as np

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, IndexedDataset
from megatron.training.data.indexed_writer import IndexedDatasetWriter
from tools.convert_nanogpt import main as convert_main
from tools.merge_datasets import main as merge_main


def make(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()


def read(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_writer_bytes_equal_megatron_core_builder(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8]]
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    b.add_document(docs[0], [1, 2])
    b.add_document(docs[1], [1])
    b.add_document(docs[2], [4])
    b.finalize(str(tmp_path / "ref.idx"))
    w = IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16)
    w.add_document(docs[0], [1, 2])
    w.add_documents(np.array(docs[1] + docs[2], np.uint16), np.array([1, 4]), np.array([1, 1]))
    w.finalize()
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"ref{ext}", "rb").read() == open(tmp_path / f"ours{ext}", "rb").read()


def test_merge_folder_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    make(shards / "b", [[3, 4], [5]])
    make(shards / "a", [[1, 2]])
    assert merge_main(["--input", str(shards), "--output-prefix", str(tmp_path / "out" / "m")]) == 0
    assert read(tmp_path / "out" / "m") == [[1, 2], [3, 4], [5]]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.add_index(str(shards / "a"))
    ref.add_index(str(shards / "b"))
    ref.finalize(str(tmp_path / "ref.idx"))
    assert open(tmp_path / "ref.idx", "rb").read() == open(tmp_path / "out" / "m.idx", "rb").read()


def test_merge_errors_name_the_file(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    make(shards / "a", [[1, 2]])
    make(shards / "wide", [[70000]], dtype=np.int32)
    assert merge_main(["--input", str(shards), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "wide.idx stores int32" in capsys.readouterr().err
    os.remove(shards / "wide.bin")
    assert merge_main(["--input", str(shards), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "wide.idx has no partner wide.bin" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.bin")


def test_nanogpt_round_trip(tmp_path):
    docs = [[5, 6, 0], [7, 0], [8, 9, 10, 0], [11, 0]]
    make(tmp_path / "ds", docs)
    assert convert_main(["to-nanogpt", "--input-prefix", str(tmp_path / "ds"), "--output-dir",
                         str(tmp_path / "ng"), "--val-fraction", "0.25"]) == 0
    train = np.fromfile(tmp_path / "ng" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "ng" / "val.bin", dtype=np.uint16)
    assert train.tolist() == [5, 6, 0, 7, 0, 8, 9, 10, 0] and val.tolist() == [11, 0]
    assert convert_main(["from-nanogpt", "--input", str(tmp_path / "ng" / "train.bin"),
                         "--output-prefix", str(tmp_path / "back"), "--eod-token", "0"]) == 0
    assert read(tmp_path / "back") == docs[:3]
    assert convert_main(["from-nanogpt", "--input", str(tmp_path / "ng" / "train.bin"),
                         "--output-prefix", str(tmp_path / "chunks"), "--chunk-tokens", "4"]) == 0
    assert read(tmp_path / "chunks") == [[5, 6, 0, 7], [0, 8, 9, 10], [0]]


def test_to_nanogpt_refuses_ids_above_uint16(tmp_path, capsys):
    make(tmp_path / "wide", [[1, 70000], [2]], dtype=np.int32)
    assert convert_main(["to-nanogpt", "--input-prefix", str(tmp_path / "wide"), "--output-dir",
                         str(tmp_path / "ng")]) == 2
    assert "above 65535" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ng" / "train.bin")
