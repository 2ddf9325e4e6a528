"""data.py: rank split, exact resume with seeking, x/y shift, bad rows, offline errors, and the
embedded corpus (rebuilt from its source and compared byte for byte)."""

import errno
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
from data import DataError, TrainStream, load_eval_sequences

V = 1000


def write_synthetic(folder, rows_per_file=(10, 7, 12), row_len=9, row_group_size=4):
    """Files whose token 0 of each row is a unique id: file * 100 + row."""
    os.makedirs(folder, exist_ok=True)
    for f, n in enumerate(rows_per_file):
        ids = np.zeros((n, row_len), dtype=np.int32)
        ids[:, 0] = f * 100 + np.arange(n)
        ids[:, 1:] = (np.arange(1, row_len) + ids[:, :1]) % V
        pq.write_table(pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}),
                       os.path.join(folder, f"part-{f}.parquet"), row_group_size=row_group_size)
    return [f * 100 + r for f, n in enumerate(rows_per_file) for r in range(n)]


def test_a_dataset_of_many_files_keeps_few_open(tmp_path):
    """Every file is checked at start, but only the one being read stays open (10,000 open files
    would pass the usual limit of 1,024)."""
    for f in range(100):
        bad_file(tmp_path / f"part-{f:03d}.parquet", [[f, 1, 2, 3, 4]])  # a good file of one row
    before = len(os.listdir("/proc/self/fd"))
    stream = TrainStream(str(tmp_path), 4, V, 2, 2)
    assert [int(x[0, 0]) for _ in range(3) for x, _ in stream.next_batch()] == [0, 2, 4]
    assert len(os.listdir("/proc/self/fd")) - before <= 3


def row_ids(subs):
    return [int(x[i, 0]) for x, _ in subs for i in range(len(x))]


@pytest.mark.parametrize("world,prefetch", [(1, True), (2, True), (3, True), (4, True), (4, False)])
def test_ranks_split_each_global_batch_disjointly_and_completely(tmp_path, monkeypatch, world, prefetch):
    """The same sequences in the same order on 1, 2, 3 and 4 ranks, each rank reading (and checking)
    only its own rows, with the next batch read ahead or not."""
    order = write_synthetic(tmp_path)  # 29 rows in 3 files: not divisible by 2
    batch, steps = 12, 9  # 108 sequences: wraps into a fourth epoch
    checked = []  # the rows each read of this test's files turned into token arrays (and checked); another
    real = data.rows_to_array  # test's stream may still be reading ahead in its thread, in other files

    def counting(table, shard_name, *a, **k):
        if shard_name.startswith(str(tmp_path)):
            checked.append(table.num_rows)
        return real(table, shard_name, *a, **k)
    monkeypatch.setattr(data, "rows_to_array", counting)
    streams = [TrainStream(str(tmp_path), 8, V, batch, batch // world // (2 if world < 3 else 1),
                           rank=r, world_size=world, prefetch=prefetch) for r in range(world)]
    seen = []
    for step in range(steps):
        per_rank = [row_ids(s.next_batch(read_ahead=step + 1 < steps)) for s in streams]
        step_rows = [i for rows in per_rank for i in rows]
        assert len(set(step_rows)) == batch  # disjoint within a step
        seen += step_rows
    assert seen == (order * 4)[:batch * steps]  # the same global order for every world size
    assert sum(checked) == batch * steps  # no rank read another's rows (one row: one sequence of 8)
    assert len({json.dumps(s.state_dict()) for s in streams}) == 1


def test_x_y_are_shifted_int64_views_of_a_row(tmp_path):
    write_synthetic(tmp_path)
    (x, y), = TrainStream(str(tmp_path), 8, V, 2, 2).next_batch()
    table = pq.read_table(tmp_path / "part-0.parquet").column("input_ids").to_pylist()
    assert x.dtype == y.dtype == torch.int64 and x.shape == (2, 8)
    assert x.tolist() == [r[:-1] for r in table[:2]] and y.tolist() == [r[1:] for r in table[:2]]


def test_long_rows_are_read_as_windows(tmp_path):
    write_synthetic(tmp_path, rows_per_file=(5,), row_len=13)  # 13 = 3 x 4 + 1
    (x, y), = TrainStream(str(tmp_path), 4, V, 6, 6).next_batch()
    row = pq.read_table(tmp_path / "part-0.parquet").column("input_ids").to_pylist()[0]
    assert x[:3].tolist() == [row[0:4], row[4:8], row[8:12]]
    assert y[:3].tolist() == [row[1:5], row[5:9], row[9:13]]
    with pytest.raises(DataError, match="rows have 13 tokens.*max_seq_len=5"):
        TrainStream(str(tmp_path), 5, V, 2, 2).next_batch()


def test_resume_yields_identical_batches_without_rereading(tmp_path, monkeypatch):
    write_synthetic(tmp_path, rows_per_file=(10, 7, 12), row_group_size=3)
    straight = TrainStream(str(tmp_path), 8, V, 4, 2)
    for _ in range(5):  # 20 sequences: into the middle of the second file, mid row group
        straight.next_batch()
    assert straight._ahead  # the sixth batch is read already: the position does not count it
    state = json.loads(json.dumps(straight.state_dict()))
    expected = [row_ids(straight.next_batch(read_ahead=i < 5)) for i in range(6)]  # (none left reading below)

    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append((self.metadata.num_rows, i)) or original(self, i, **kw))
    resumed = TrainStream(str(tmp_path), 8, V, 4, 2)
    resumed.load_state_dict(state)
    first = row_ids(resumed.next_batch())
    assert first == expected[0]
    assert reads[0] == (12, 1)  # sequence 20 = row 3 of the third file: its row group 1 comes first
    assert [first] + [row_ids(resumed.next_batch()) for _ in range(5)] == expected


def test_peek_does_not_move_the_stream(tmp_path):
    write_synthetic(tmp_path)
    s = TrainStream(str(tmp_path), 8, V, 4, 1, rank=1, world_size=2)
    s.next_batch()
    peeked = s.peek_global_batch()
    subs = s.next_batch()
    assert [int(r[0]) for r in peeked[2:]] == row_ids(subs)


def test_resume_rejects_a_changed_dataset(tmp_path):
    write_synthetic(tmp_path)
    s = TrainStream(str(tmp_path), 8, V, 4, 2)
    state = {**s.state_dict(), "shard": 1}
    with pytest.raises(DataError, match="cannot resume"):
        s.load_state_dict(state)


def bad_file(path, rows, type_=None, name="input_ids"):
    type_ = type_ or pa.list_(pa.int32())
    pq.write_table(pa.table({name: pa.array(rows, type=type_)}), path)


@pytest.mark.parametrize("rows,name,message", [
    ([[1] * 9, [2] * 9, [3] * 8], "input_ids", r"bad\.parquet row 2: 8 tokens, expected 9"),
    ([[1] * 9, None], "input_ids", r"bad\.parquet row 1: input_ids is missing"),
    ([[1] * 9, [5] * 8 + [V]], "input_ids", rf"bad\.parquet row 1: token id {V} outside \[0, {V}\)"),
    ([[1] * 9, [-3] * 9], "input_ids", r"bad\.parquet row 1: token id -3"),
    ([[1] * 9], "tokens", r"bad\.parquet: no 'input_ids' column"),
])
def test_bad_rows_stop_with_file_and_row(tmp_path, rows, name, message):
    bad_file(tmp_path / "bad.parquet", rows, name=name)
    with pytest.raises(DataError, match=message):
        TrainStream(str(tmp_path), 8, V, len(rows), len(rows)).next_batch()


def test_hub_name_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE.*embedded corpus.*local folder"):
        TrainStream("pico-lm/pretokenized-dolma", 2048, 50304, 8, 8)
    assert time.perf_counter() - start < 2


def test_save_to_disk_folder_and_eval_rows_of_max_seq_len(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [[i] * 8 for i in range(5)]
    datasets.Dataset.from_dict({"input_ids": rows, "text": ["t"] * 5}).save_to_disk(str(tmp_path / "ds"))
    ev = load_eval_sequences(str(tmp_path / "ds"), 8, V)  # 8-token rows for an 8-token model
    assert ev.shape == (5, 8) and ev[:, 0].tolist() == list(range(5))
    s = TrainStream(str(tmp_path / "ds"), 7, V, 5, 5)
    (x, y), = s.next_batch()
    assert x[:, 0].tolist() == list(range(5))


def test_one_retry_rule_for_every_hub_call(monkeypatch, caplog):
    """hub.transient, used by the uploads (hub.py) and the dataset reads (data.py): a 5xx, a 429 or
    no answer at all is retried; any other answer (401, 403, 404, ...) or a local error is not."""
    import httpx
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    import hub

    def answer(status, cls=HfHubHTTPError):
        return cls(f"HTTP {status}", response=httpx.Response(status, request=httpx.Request("GET", "http://hub/x")))

    def wrapped(cause, cls=RuntimeError):  # as a client raises it: its own error, the network one as the cause
        try:
            raise cause
        except Exception as e:
            try:
                raise cls("upload failed") from e
            except cls as outer:
                return outer
    retried = [answer(500), answer(502), answer(503), answer(429), httpx.ConnectError("refused"),
               httpx.ReadTimeout("slow"), ConnectionResetError("reset by peer"), TimeoutError("timed out"),
               wrapped(httpx.RemoteProtocolError("cut off")), wrapped(ConnectionRefusedError()),
               # another thread's outage
               wrapped(RuntimeError("Cannot send a request, as the client has been closed.")),
               wrapped(httpx.ConnectError("refused"), LocalEntryNotFoundError)]  # hf_hub_download with no network
    not_retried = [answer(400), answer(401), answer(403), answer(404, RepositoryNotFoundError), answer(404),
                   wrapped(answer(401)), FileNotFoundError("x"), PermissionError("x"), ValueError("x"),
                   KeyError("x"), TypeError("a bug"), wrapped(ValueError("a malformed answer")),
                   OfflineModeIsEnabled("HF_HUB_OFFLINE is set"), LocalEntryNotFoundError("local_files_only"),
                   wrapped(OSError(errno.ENOSPC, "No space left on device")),
                   wrapped(OfflineModeIsEnabled("HF_HUB_OFFLINE is set"), LocalEntryNotFoundError)]
    assert [hub.transient(e) for e in retried] == [True] * len(retried)
    assert [hub.transient(e) for e in not_retried] == [False] * len(not_retried)

    # data.py: a few tries, then one DataError naming what failed; a permanent error at once
    waits, calls = [], []
    monkeypatch.setattr(hub.time, "sleep", waits.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"
    assert data._retry(flaky, "reading x") == "ok" and len(calls) == 3 and waits == [1.0, 2.0]
    assert "reading x failed (ConnectionError: connection reset by peer); retry 1/5 in 1s" in caplog.text

    def down():
        raise TimeoutError("timed out")
    with pytest.raises(DataError, match="reading y: still failing after 6 attempts"):
        data._retry(down, "reading y")

    def refused():
        calls.append(1)
        raise answer(403)
    calls.clear()
    with pytest.raises(DataError, match=r"reading z: the Hub refused \(HfHubHTTPError"):  # one line, at once
        data._retry(refused, "reading z")
    assert len(calls) == 1


def test_a_full_disk_is_said_at_once(tmp_path, monkeypatch):
    """A download that fills the disk is not retried as if the network failed: one line naming the
    file, the folder and what to do."""
    import huggingface_hub
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    shards = data.HubShards("tester/tokens", "0" * 40, ["data/train-0.parquet"], str(tmp_path))
    with pytest.raises(DataError, match=rf"downloading datasets/tester/tokens/data/train-0.parquet: no space left in "
                                        rf"{tmp_path} \(No space left on device\); free some, point data_cache_dir"):
        shards.path(0)
    assert len(calls) == 1


def test_embedded_corpus(tmp_path):
    assert data.file_sha256(data.TOKENIZER_PATH) == data.TOKENIZER_SHA256
    provenance = open(os.path.join(data.DEMO_DIR, "PROVENANCE.md")).read()
    counts = data.build_demo_corpus(out_dir=str(tmp_path))
    for split in ("train", "validation"):
        committed = os.path.join(data.DEMO_DIR, f"{split}.parquet")
        rebuilt = str(tmp_path / f"{split}.parquet")
        assert pq.read_table(rebuilt).equals(pq.read_table(committed))
        assert f"{counts[split + '_rows']} rows" in provenance
        if f"pyarrow {pa.__version__}" in provenance:  # bytes depend on the writer's version
            assert data.file_sha256(rebuilt) == data.file_sha256(committed)
            assert data.file_sha256(committed) in provenance
    ids = pq.read_table(rebuilt).column("input_ids").to_pylist()
    assert all(len(r) == 2049 for r in ids) and data.EOS_TOKEN_ID in ids[0]
    tok = data.load_tokenizer()
    assert pq.read_table(rebuilt).column("text")[0].as_py() == tok.decode(ids[0], skip_special_tokens=False)
    train = TrainStream(data.DEMO_DIR, 256, 50304, 16, 16)
    assert train.next_batch()[0][0].shape == (16, 256)


def test_tokenize_your_own_files(tmp_path):
    docs = []
    for i in range(6):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(("In the beginning was the word. " * 40) + f"Document {i}.")
    n_train, n_val = data.tokenize_files([str(d) for d in docs], str(tmp_path / "out"), row_len=129, val_every=3)
    assert n_train > 0 and n_val > 0
    x, y = TrainStream(str(tmp_path / "out"), 128, 50304, 2, 2).next_batch()[0]
    assert x.shape == (2, 128)
    assert load_eval_sequences(str(tmp_path / "out"), 128, 50304, split="validation").shape[1] == 129


HUB_STREAM = r'''
import json, os, sys, threading, time
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from hub_server import HubServer
server = HubServer().start()
os.environ.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_test",
                  HF_HUB_DISABLE_PROGRESS_BARS="1")
from huggingface_hub import HfApi, CommitOperationAdd
api = HfApi()
api.create_repo("tester/tokens", repo_type="dataset")
api.create_commit("tester/tokens", repo_type="dataset", commit_message="data", operations=[
    CommitOperationAdd(path_in_repo=f"data/train-{i}.parquet", path_or_fileobj=os.path.join(SRC, f"part-{i}.parquet"))
    for i in range(3)])
import data
real_sleep = time.sleep
time.sleep = lambda s: real_sleep(min(s, 0.2))  # quick retries (hub.retry's and the client's)
ids = lambda subs: [int(x[i, 0]) for x, _ in subs for i in range(len(x))]
stream = data.TrainStream("tester/tokens", 8, 1000, 4, 2, cache_dir=os.path.join(SRC, "cache1"))
out = {"first": [ids(stream.next_batch()) for _ in range(5)], "state": stream.state_dict()}
out["next"] = [ids(stream.next_batch()) for _ in range(2)]
blobs = os.path.join(SRC, "cache2", "datasets--tester--tokens", "blobs")  # partial downloads of killed runs:
os.makedirs(blobs)
for name, age in (("old", 3600), ("new", 0)):  # one left an hour ago, one still growing
    open(os.path.join(blobs, f"{name}.0123abcd.incomplete"), "w").write("partial")
    os.utime(os.path.join(blobs, f"{name}.0123abcd.incomplete"), (time.time() - age,) * 2)
resumed = data.TrainStream("tester/tokens", 8, 1000, 4, 2, cache_dir=os.path.join(SRC, "cache2"))
out["partial"] = sorted(f for f in os.listdir(blobs) if f.endswith(".incomplete"))
resumed.load_state_dict(out["state"])
server.state.requests.clear()
server.stop()  # an outage: the download must be retried, then go on
threading.Timer(3.0, server.start).start()  # (longer than the client's own retries, sleeping 0.2 s each)
out["resumed"] = [ids(resumed.next_batch(read_ahead=i == 0)) for i in range(2)]  # (the last: as train.py's)
out["fetched"] = [p.split("/")[-1] for m, p in server.state.requests if m == "GET" and "/resolve/" in p]
skipper = data.TrainStream("tester/tokens", 8, 1000, 4, 2, cache_dir=os.path.join(SRC, "cache3"))
skipper.load_state_dict({**out["state"], "shard": 0, "shard_name": "train-0.parquet", "seq": 0})
sent = server.state.bytes_sent
skipper.skip(20)  # to where 5 batches of 4 took the first stream, counting rows by the files' footers
out["skipped"], out["skip_bytes"] = skipper.state_dict(), server.state.bytes_sent - sent
cached = os.path.join(SRC, "cache3", "datasets--tester--tokens")
out["skip_fetched"] = [f for _, _, files in os.walk(cached) for f in files]
try:
    data.TrainStream("tester/nothing", 8, 1000, 4, 2)
except data.DataError as e:
    out["missing"] = str(e)
print(json.dumps(out))
'''


@pytest.mark.slow
def test_streams_a_hub_dataset_and_resumes_by_seeking(tmp_path):
    """The Hub path (whole files into a cache folder) against the local Hub server: the same rows
    as the local files, a resume that downloads only the file it needs, and a download that
    survives an outage."""
    import subprocess
    import sys
    order = write_synthetic(tmp_path / "src", row_group_size=3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"ROOT = {root!r}\nSRC = {str(tmp_path / 'src')!r}\n"
    proc = subprocess.run([sys.executable, "-c", script + HUB_STREAM], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    flat = [i for b in out["first"] + out["next"] for i in b]
    assert flat == order[:28]
    assert out["resumed"] == out["next"]
    # position 20 is in the third and last file: nothing before it is downloaded, and nothing after
    # it (the next pass's first file is fetched when it is reached, not ahead)
    assert out["fetched"] == ["train-2.parquet"]
    assert "downloading datasets/tester/tokens/data/train-2.parquet failed" in proc.stderr  # the outage was met
    assert out["partial"] == ["new.0123abcd.incomplete"]
    assert out["missing"].startswith("tester/nothing: no such dataset on the Hugging Face Hub (http://127.0.0.1:")
    # skip() moves over files by their footers: the same position, and no file downloaded
    assert out["skipped"] == out["state"] and out["skip_fetched"] == [] and out["skip_bytes"] > 0


@pytest.mark.slow
def test_the_ranks_of_a_node_download_each_file_once(tmp_path):
    """4 ranks in lockstep (bench.hub_data_cost) on a 4-file Hub dataset: each file is sent once,
    every rank gets its slice of the global order, and with a disk budget of 0 only the file being
    read is left in the cache at the end."""
    import bench
    folder = bench.synthetic_parquet(str(tmp_path), files=4, rows=96)
    steps, batch = 12, 32  # one pass: 4 x 96 rows of 2049 tokens = 384 sequences of 2048
    r = bench.hub_data_cost(folder, steps, workers=4, batch=batch, budget_gb=0.0)
    ref = TrainStream(folder, 2048, 50304, batch, batch)
    order = [int(t) for _ in range(steps) for x, _ in ref.next_batch() for t in x[:, 0]]
    for rank, got in enumerate(r["ranks"]):
        assert got["rows"] == [t for s in range(steps) for t in order[s * batch + rank * 8:s * batch + rank * 8 + 8]]
    assert r["gets"] == {f"train-{i:05d}.parquet": 1 for i in range(4)}
    assert r["bytes_sent"] / r["bytes_read"] <= 1.1, r  # the file listings and answers to HEAD requests included
    assert r["cached"] == ["train-00003.parquet"]
    assert r["cache_bytes"] < 1.1 * os.path.getsize(os.path.join(folder, "train-00003.parquet"))  # its blob alone


@pytest.mark.slow
@pytest.mark.parametrize("nproc,args", [(1, ()), (2, ("--max_steps=12", "--save_every_n_steps=5",
                                                        "--gradient_accumulation_steps=1"))])
def test_data_py_batch_is_what_each_checkpoint_says_its_next_step_trained_on(tmp_path, reference_run, nproc, args):
    """`python data.py batch RUN --step N` works out the global batch of step N -> N + 1 from the run's
    settings and data alone: the same bytes as every checkpoint's learning_dynamics/train_data (the
    rows captured from the batch the run then trained on), on 1 process and on 2."""
    import shutil
    import subprocess
    import sys

    import checkpoint
    import dynamics
    from helpers import ROOT
    run = reference_run(*args, nproc=nproc) / "ref"
    steps = [s for s in checkpoint.saved_steps(run)
             if (run / "checkpoints" / f"step_{s}" / "learning_dynamics" / "train_data").is_dir()]
    assert len(steps) >= 2
    tokenizer = data.load_tokenizer()

    def same(step, run_dir, out):
        rows, _ = data.global_batch(str(run_dir), step)
        dynamics.save_rows(rows, str(out), tokenizer)
        saved = run / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train_data"
        assert sorted(os.listdir(out)) == sorted(os.listdir(saved))
        return all((out / n).read_bytes() == (saved / n).read_bytes() for n in os.listdir(saved))
    assert all(same(s, run, tmp_path / f"b{s}") for s in steps)
    # from the first checkpoint alone, whole batches on (the others hidden): the same rows
    shutil.copytree(run, tmp_path / "first", symlinks=True)
    for s in steps[1:]:
        shutil.rmtree(tmp_path / "first" / "checkpoints" / f"step_{s}")
    assert same(steps[-1], tmp_path / "first", tmp_path / "from_first")
    # the command, and its one line for a step the run never trains
    proc = subprocess.run([sys.executable, "data.py", "batch", str(run), "--step", str(steps[-1]), "--out",
                           str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "cli" / "state.json").read_bytes() == \
        (tmp_path / f"b{steps[-1]}" / "state.json").read_bytes(), proc.stderr
    proc = subprocess.run([sys.executable, "data.py", "batch", str(run), "--step", "99", "--out",
                           str(tmp_path / "late")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("data error: step 99 is not one that")
    with pytest.raises(DataError, match="has no training_config.yaml: not a run folder"):
        data.global_batch(str(tmp_path / "nowhere"), 0)


def test_skip_moves_the_position_as_reading_would(tmp_path):
    write_synthetic(tmp_path, rows_per_file=(10, 7, 12), row_len=17, row_group_size=3)  # 2 sequences of 8 a row
    for n in (0, 1, 19, 20, 57, 58, 59, 200, 1001):
        read, skipped = TrainStream(str(tmp_path), 8, V, 1, 1), TrainStream(str(tmp_path), 8, V, 1, 1)
        for _ in range(n):
            read.next_batch()
        skipped.skip(n)
        assert skipped.state_dict() == read.state_dict(), n
        assert torch.equal(torch.from_numpy(skipped.peek_global_batch()), torch.from_numpy(read.peek_global_batch()))
