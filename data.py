"""
Pre-tokenized data for pico-train: where rows come from, how ranks share them, how a run resumes.

A dataset is an ordered list of shards (parquet files, locally or on the Hugging Face Hub, or a
`Dataset.save_to_disk` folder), each holding rows of `input_ids`. pico-lm/pretokenized-dolma rows
have 2049 tokens: a model with max_seq_len T = 2048 reads x = row[:-1], y = row[1:]. A model with a
shorter T reads each row as (2049 - 1) / T consecutive sequences of T + 1 tokens (neighbours share
one token), so the same rows feed every sequence length that divides 2048.

The training stream is one global order of sequences that does not depend on the number of ranks:
optimizer step s trains on sequences [s * B, (s + 1) * B) (B = batch_size) and rank r takes the
r-th contiguous slice of that global batch, reading only the rows that hold it (the others' are
counted, not read), so the whole run sees the same data on 1 or 64 GPUs, and the position to resume
from is just (epoch, shard, sequence within shard): resuming opens that shard and seeks to the row
group that holds the sequence, reading nothing before it. A background thread reads and checks the
next step's share while the current step computes (into pinned memory when the rows go to a GPU);
the position counts only the batches handed to training, so a checkpoint never counts the one
prepared ahead.

Hub datasets are read from whole files downloaded once per node into a cache folder (HubShards:
the next file comes in the background, passed ones are removed to stay within a disk budget), so
each byte crosses the network once per node however many ranks read it. Not through `datasets`'
IterableDataset: with datasets 5.2 its state_dict() did not move when iterating in batches, and
its resume reads the current shard from the start. `datasets` is used for `save_to_disk` folders.

The file reads from the training loop outwards: the training stream (TrainStream) and the
evaluation rows, then rows -> checked token arrays, then the shards they come from (local parquet,
the Hub cache, save_to_disk tables), then the corpus tools.

Run as a script it builds the embedded demo corpus, tokenizes your own text, or says what a step
of a run trained on:
    python data.py build-demo            # rebuild data/demo/*.parquet from data/demo/kjv.txt.xz
    python data.py tokenize a.txt b.txt --out data/mine   # one document per file
    python data.py batch runs/demo --step 40 --out step40/   # the global batch of step 40 -> 41
"""

import argparse
import difflib
import errno
import glob
import hashlib
import json
import logging
import lzma
import os
import re
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import hub
from model import EOS_TOKEN_ID  # <|endoftext|>; pico-lm puts one after each document

log = logging.getLogger("pico.data")

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(HERE, "data", "demo")
TOKENIZER_PATH = os.path.join(HERE, "data", "tokenizer", "allenai_gpt-neox-olmo-dolma-v1_5.json")
TOKENIZER_SHA256 = "9ad33b4b39a9f83973c3f8c42a01948dd5b877a28ac9a5356956c4ff4ed0b714"
ROW_LEN = 2049
MAX_ROW_TOKENS = 2**20  # longer rows are refused unread: 1 row of 2049 tokens is pico-train's


class DataError(ValueError):
    """A problem with the data itself (a bad row, a missing column, an unreachable dataset)."""


class MissingSplit(DataError):
    """The dataset has no files (or table) for the split asked for."""


# ----------------------------------------------------------------------------------------------
# the training stream

class TrainStream:
    """The global sequence order of a training set, cut into per-rank sub-batches.

    next_batch() returns this rank's sub-batches for one optimizer step: a list of
    gradient_accumulation_steps (x, y) pairs, each (sub_batch, seq_len) int64 on `device`; with
    prefetch, the next step's are read meanwhile (problem() waits for them and says whether they
    are good). state_dict() is a small JSON-able dict; load_state_dict() resumes exactly there."""

    def __init__(self, name, seq_len, vocab_size, batch_size, sub_batch, rank=0, world_size=1,
                 split="train", device="cpu", cache_dir=None, cache_budget_gb=None, fetcher=True, prefetch=True):
        if batch_size % (sub_batch * world_size):
            raise ValueError(f"batch_size {batch_size} is not divisible by sub_batch {sub_batch} x "
                             f"world_size {world_size}")
        self.name, self.seq_len, self.vocab_size = name, seq_len, vocab_size
        self.batch_size, self.sub_batch, self.rank, self.world_size = batch_size, sub_batch, rank, world_size
        self.device, self.prefetch = device, prefetch
        self.shards = open_shards(name, split, cache_dir=cache_dir)
        # a Hub dataset: its files come into the node's cache; the fetcher (one rank per node) fetches the
        # next one in the background and removes passed ones while they take more than the budget
        self.hub = getattr(self.shards[0], "hub", None)
        self.fetcher, self.budget = fetcher, None if cache_budget_gb is None else cache_budget_gb * 2**30
        if self.hub and fetcher:
            self.hub.sweep()
        if self.hub:
            self.hub.refuse_shared_cache(rank, fetcher)
        # open local shards now (a footer each, closed again: 10,000 open files would pass the limit),
        # so an empty or broken file stops the run before any work; a Hub dataset (10,000 shards)
        # downloads each file as the run reaches it
        if not self.hub:
            rows = 0
            for shard in self.shards:
                rows += shard.num_rows
                shard.close()
            if rows == 0:
                raise DataError(f"{name}: the dataset has no rows")
        self.epoch, self.shard, self.seq = 0, 0, 0  # position of the next sequence
        self._row_len = self._windows = None  # learnt from the first row read (or a saved state)
        self._saved_row_len = False  # the row length came from a checkpoint, and no row has been read yet
        self._ahead = None  # (position, Background) of this rank's share of the next batch, read ahead

    def _seqs_per_row(self, shard):
        if self._windows is None:  # all shards of a dataset share one row length
            first = shard.read(0, 1)
            row_len = int(list_lengths(first.column("input_ids").combine_chunks())[0])
            self._windows = windows_per_row(row_len, self.seq_len, shard.name)
            self._row_len = row_len
        return self._windows

    def _read(self, n, lo=0, hi=None):
        """Sequences [lo, hi) of the n from the position on, as (hi - lo, T + 1), and the position after
        the n; the position itself does not move (a read ahead runs in a thread while others look at it).
        Only the rows that hold the wanted sequences are read (the others are counted from metadata)."""
        out, empty, done, hi = [], 0, 0, n if hi is None else hi
        epoch, i, seq = self._position()
        while done < n:
            if empty > len(self.shards):
                raise DataError(f"{self.name}: the dataset has no rows")
            shard = self.shards[i]
            k = self._seqs_per_row(shard)
            total = shard.num_rows * k
            if seq > total:  # only a saved position can be
                raise self._not_resumable(f"its data position, sequence {seq:,} of {shard.name}, is past "
                                          f"its end ({total:,} sequences)")
            if seq == total:  # end of shard -> next shard, next epoch after the last one
                shard.close()
                i, seq, empty = i + 1, 0, empty + (total == 0)
                if i == len(self.shards):
                    i, epoch = 0, epoch + 1
                    log.info("%s: end of data, starting epoch %d", self.name, epoch)
                continue
            if self.hub and self.fetcher and i + 1 < len(self.shards):
                # the next file downloads while this one trains (not past the end: a run of one pass,
                # as the published configs are, would fetch the first file again for nothing)
                self.hub.prefetch(i + 1)
            take = min(n - done, total - seq)
            a, b = seq + max(lo - done, 0), seq + min(hi - done, take)  # the wanted ones in this shard
            if a < b:
                row0, row1 = a // k, (b - 1) // k + 1
                table = shard.read(row0, row1, row_len=None if self._saved_row_len else self._row_len)
                if self._saved_row_len:  # a checkpoint's row length, held against the first row read
                    self._saved_row_len = False
                    found = int(list_lengths(table.column("input_ids").combine_chunks())[0])
                    if found != self._row_len:
                        raise self._not_resumable(f"its data position counts rows of {self._row_len} tokens, "
                                                  f"but {shard.name} has rows of {found}")
                ids = rows_to_array(table, shard.name, row0, self.vocab_size, self._row_len)
                seqs = to_windows(ids, self.seq_len) if k > 1 else ids
                out.append(seqs[a - row0 * k:b - row0 * k])
            seq, done = seq + take, done + take
        return (np.concatenate(out) if len(out) > 1 else out[0]), (epoch, i, seq)

    def skip(self, n):
        """Move the position n sequences on, as reading them would, without reading a row: each
        shard's length is its metadata (a Hub file's footer alone; the row length is a checkpoint's,
        or one row's)."""
        self._settle()
        total = None
        while n > 0:
            shard = self.shards[self.shard]
            left = shard.count_rows() * self._seqs_per_row(shard) - self.seq
            if n <= left:
                self.seq += n
                return
            n -= left
            self.shard, self.seq = self.shard + 1, 0
            if self.shard == len(self.shards):  # a whole epoch at a time from here
                self.shard, self.epoch = 0, self.epoch + 1
                if total is None:
                    total = sum(s.count_rows() for s in self.shards) * self._windows
                    if total == 0:
                        raise DataError(f"{self.name}: the dataset has no rows")
                self.epoch, n = self.epoch + n // total, n % total

    def peek_global_batch(self):
        """The whole next global batch (batch_size, T + 1), without moving the position."""
        self._settle()
        return self._read(self.batch_size)[0]

    def _position(self):
        return self.epoch, self.shard, self.seq

    def _my_share(self):
        """This rank's rows of the next global batch, as a tensor (pinned if they go to a GPU), and the
        position after the batch; the position itself stays where it is."""
        per_rank = self.batch_size // self.world_size
        mine, after = self._read(self.batch_size, self.rank * per_rank, (self.rank + 1) * per_rank)
        mine = torch.from_numpy(mine)
        return (mine.pin_memory() if str(self.device).startswith("cuda") else mine), after

    def _settle(self):
        """Let a read ahead finish (its result is kept): the shards' files are read by one thread at a time."""
        if self._ahead:
            self._ahead[1].wait()

    def problem(self):
        """Waits for the next batch read ahead; returns why it cannot be trained on (a DataError's
        message), or None. Each rank reads its own rows, so each can fail alone: train.py shares this."""
        if not self.prefetch:
            return None
        if not self._ahead or self._ahead[0] != self._position():
            self._settle()
            self._ahead = (self._position(), Background(self._my_share))
        self._ahead[1].wait()
        error = self._ahead[1].error
        return str(error) if isinstance(error, DataError) else None

    def next_batch(self, read_ahead=True):
        """This rank's sub-batches of the next step; read_ahead (with prefetch): start reading the
        step after's (False at the last step: past the data's end it would fetch the first file again)."""
        ahead, self._ahead = self._ahead, None
        if ahead and ahead[0] == self._position():
            mine, after = ahead[1].result()  # (the read ahead's DataError, if it failed)
        else:
            if ahead:
                ahead[1].wait()
            mine, after = self._my_share()
        first = self.shard
        self.epoch, self.shard, self.seq = after
        if self.hub and self.fetcher and self.budget is not None:
            # every rank has trained on the previous batch (its gradients were reduced), so none reads
            # before `first` any more
            self.hub.evict(first, self.shard, self.budget)
        if self.prefetch and read_ahead:  # the next batch is read while this one trains
            self._ahead = (after, Background(self._my_share))
        subs = []
        for chunk in mine.split(self.sub_batch):
            chunk = chunk.to(self.device, non_blocking=True)  # from pinned memory: overlaps the GPU's work
            subs.append((chunk[:, :-1], chunk[:, 1:]))
        return subs

    def state_dict(self):
        """The position after the batches handed to training (not the one read ahead)."""
        self._settle()
        return {"dataset": self.name, "epoch": self.epoch, "shard": self.shard,
                "shard_name": os.path.basename(self.shards[self.shard].name), "seq": self.seq,
                "row_len": self._row_len}

    def load_state_dict(self, state):
        self._settle()
        shard = state["shard"]
        if not 0 <= shard < len(self.shards) or os.path.basename(self.shards[shard].name) != state["shard_name"]:
            raise DataError(f"cannot resume {self.name}: the saved position is in shard "
                            f"{state['shard']} ({state['shard_name']}), which this dataset no longer "
                            f"has at that index ({len(self.shards)} shards now)")
        self.epoch, self.shard, self.seq = state["epoch"], state["shard"], state["seq"]
        if state.get("row_len"):  # known already: no need to read a row to learn it (checked at the first read)
            self._row_len, self._saved_row_len = state["row_len"], True
            try:
                self._windows = windows_per_row(self._row_len, self.seq_len, self.name)
            except DataError:
                raise self._not_resumable(f"its data position counts rows of {self._row_len} tokens, which no "
                                          f"max_seq_len={self.seq_len} dataset has") from None

    def _not_resumable(self, what):
        return DataError(f"cannot resume {self.name} from the checkpoint: {what}; the data changed since that "
                         f"checkpoint, or the checkpoint is damaged")


class Background:
    """fn() in a daemon thread (one that never holds up the process's exit); result() waits for it
    and returns its value or raises its exception."""

    def __init__(self, fn):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name="pico-data", daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            self.error = e

    def wait(self):
        self.thread.join()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def global_batch(run_dir, step):
    """The exact global batch, (batch_size, max_seq_len + 1) token ids in rank order, that a run's
    optimizer step from `step` to step + 1 trains on, from its settings and data alone, reading no
    row before it: the data position saved in its nearest checkpoint at or before `step` (before a
    fork's first, its parent's; the start if none), moved on by whole batches. Returns (rows, settings)."""
    import checkpoint
    import configurator
    yaml_path = os.path.join(run_dir, "training_config.yaml")
    if not os.path.lexists(yaml_path):
        raise DataError(f"{run_dir} has no training_config.yaml: not a run folder (or not one of this pico-train)")
    settings = configurator.read_yaml(yaml_path)
    missing = [k for k in ("dataset_name", "dataset_split", "max_seq_len", "vocab_size", "batch_size", "max_steps")
               if k not in settings]
    if missing:
        raise DataError(f"{yaml_path} lacks the settings {', '.join(missing)}, so its batches cannot be worked out")
    if not 0 <= step < settings["max_steps"]:
        raise DataError(f"step {step} is not one that {run_dir} trains: its optimizer steps start at steps 0 to "
                        f"{settings['max_steps'] - 1} (max_steps {settings['max_steps']})")
    start, position, batch_size = 0, None, settings["batch_size"]
    folders = [checkpoint.step_dir(run_dir, s) for s in checkpoint.saved_steps(run_dir) if s <= step]
    parent = settings.get("init_from") or "scratch"  # a fork: before its own first checkpoint, its parent's position
    if not folders and parent != "scratch" and os.path.lexists(os.path.join(parent, checkpoint.MANIFEST)):
        folders = [parent]
    if folders:
        try:
            start = checkpoint.folder_step(folders[-1])
            checkpoint.verify(folders[-1], only=("training_state.pt",))
            checkpoint.scan(folders[-1])
            state = checkpoint.load_state(os.path.join(folders[-1], "training_state.pt"), mmap=True)
            checkpoint.check_training_state(state, os.path.join(folders[-1], "training_state.pt"), start)
        except checkpoint.CheckpointError as e:
            raise DataError(f"the data position of {folders[-1]} cannot be read: {e}") from None
        if start > step:
            raise DataError(f"step {step} is not one that {run_dir} trains: it starts at step {start}, "
                            f"from {parent}")
        if [state["config"].get(k) for k in ("dataset_name", "dataset_split")] == [settings["dataset_name"],
                                                                                   settings["dataset_split"]]:
            position = state["data"]  # (a fork on other data started at its beginning)
        if folders[-1] != parent:  # the run's own checkpoint: its session's batch size (a fork has its own)
            batch_size = state["config"].get("batch_size", batch_size)
    stream = TrainStream(settings["dataset_name"], settings["max_seq_len"], settings["vocab_size"], batch_size,
                         batch_size, split=settings["dataset_split"], cache_dir=settings.get("data_cache_dir"))
    if position:
        stream.load_state_dict(position)
    stream.skip((step - start) * batch_size)
    return stream.peek_global_batch(), settings


def load_eval_sequences(name, seq_len, vocab_size, split=None, max_rows=None, cache_dir=None):
    """A fixed evaluation set as an (N, L) int64 array, L = seq_len + 1 (rows cut into windows
    like training rows) or L = seq_len (rows of exactly max_seq_len tokens, as paloma-tinsy's
    2048-token rows: their predictions are row[1:] from row[:-1])."""
    arrays, rows = [], 0
    for shard in open_shards(name, split, cache_dir=cache_dir):
        n = shard.num_rows if max_rows is None else min(shard.num_rows, max_rows - rows)
        if n > 0:
            arrays.append(rows_to_array(shard.read(0, n), shard.name, 0, vocab_size))
            rows += n
    if not arrays:
        raise DataError(f"{name}: its {split or 'evaluation'} split has no rows to evaluate on; name another "
                        f"(eval_dataset_name, eval_dataset_split)")
    lengths = {a.shape[1] for a in arrays}
    if len(lengths) != 1:
        raise DataError(f"{name}: shards have different row lengths {sorted(lengths)}")
    ids = np.concatenate(arrays)
    if ids.shape[1] == seq_len:
        return ids
    windows_per_row(ids.shape[1], seq_len, name)
    return to_windows(ids, seq_len)


# ----------------------------------------------------------------------------------------------
# rows -> checked int64 token arrays

def rows_to_array(table, shard_name, first_row, vocab_size, row_len=None):
    """Turn a table of input_ids rows into an (n, row_len) int64 array, refusing bad rows with
    the shard and row number. Nothing is padded, truncated or skipped."""
    check_schema(table.schema, shard_name)
    col = table.column("input_ids").combine_chunks()
    lengths = list_lengths(col)
    if col.null_count:
        bad = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise DataError(f"{shard_name} row {first_row + bad}: input_ids is missing (null)")
    if row_len is None and len(lengths):
        row_len = int(lengths[0])  # the first row sets the length the others must have
    if len(lengths) and (lengths != row_len).any():
        bad = int(np.flatnonzero(lengths != row_len)[0])
        raise DataError(f"{shard_name} row {first_row + bad}: {lengths[bad]} tokens, expected {row_len}")
    ids = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(lengths), row_len)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(np.flatnonzero(((ids < 0) | (ids >= vocab_size)).any(axis=1))[0])
        tok = ids[bad][(ids[bad] < 0) | (ids[bad] >= vocab_size)][0]
        raise DataError(f"{shard_name} row {first_row + bad}: token id {tok} outside [0, {vocab_size})")
    return ids


def list_lengths(col):
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def windows_per_row(row_len, seq_len, where):
    """How many training sequences of seq_len + 1 tokens one row holds."""
    if row_len == seq_len + 1:
        return 1
    if row_len > seq_len + 1 and (row_len - 1) % seq_len == 0:
        return (row_len - 1) // seq_len
    raise DataError(f"{where}: rows have {row_len} tokens, which a model with max_seq_len={seq_len} "
                    f"cannot use exactly: it needs rows of max_seq_len + 1 tokens, or rows of k * "
                    f"max_seq_len + 1 (2049 = 8 x 256 + 1 serves max_seq_len 256)")


def to_windows(ids, seq_len):
    """(n, k * seq_len + 1) -> (n * k, seq_len + 1): consecutive windows sharing one token."""
    n, row_len = ids.shape
    k = (row_len - 1) // seq_len
    idx = np.arange(k)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (k, seq_len + 1)
    return ids[:, idx].reshape(n * k, seq_len + 1)


# ----------------------------------------------------------------------------------------------
# shards: where rows come from

def _retry(fn, what, attempts=6, hint="Check the network or use a local copy of the data."):
    """fn(), retried by hub.py's rule (5xx, 429, no answer) a few times, then one clear DataError.
    A refusal (401, 403, ...) is one DataError at once; a missing dataset or file goes up as it is.
    Neither message holds the Hub token, even where the server repeats it."""
    try:
        return hub.retry(fn, what, log.warning, attempts)
    except Exception as e:  # noqa: BLE001 - sorted out below
        if hub.transient(e):
            raise DataError(f"{what}: still failing after {attempts} attempts ({type(e).__name__}: "
                            f"{hub.error_line(e)}). {hint}") from None
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
        if isinstance(e, HfHubHTTPError) and not isinstance(e, RepositoryNotFoundError):
            raise DataError(f"{what}: the Hub refused ({type(e).__name__}: {hub.error_line(e)}); check the dataset "
                            f"name and that your token (HF_TOKEN or `huggingface-cli login`) may read it") from None
        raise


def _brief(e):
    """An error's message on one line, shortened (pyarrow's run over several)."""
    return " ".join(str(e).split())[:200]


def printable(name):
    """A name from a dataset (a file name, perhaps someone else's) as it may be shown on a terminal:
    as it is if every character prints, else as Python's repr, so escape sequences stay inert."""
    return name if name.isprintable() else repr(name)


class ParquetShard:
    """One parquet file: a local path, or file `index` of a Hub dataset (`hub`, a HubShards),
    downloaded whole into the node's cache the first time it is opened."""

    def __init__(self, name, hub=None, index=None):
        self.source, self.hub, self.index = name, hub, index
        self.name = printable(name)  # what messages show
        self._file = None
        self._cached = (None, None)  # (row group index, table) of the last row group read

    def _open(self):
        if self._file is None:
            path = self.hub.path(self.index) if self.hub else self.source
            if os.path.getsize(path) == 0:
                raise DataError(f"{self.name}: the file is empty (0 bytes); remove it or write it again")
            try:
                self._file = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:  # not parquet, or a damaged footer
                raise DataError(f"{self.name}: not a parquet file, or a damaged one ({_brief(e)}); dataset_name "
                                f"must hold parquet files of token ids (python data.py tokenize makes them from "
                                f"text)") from None
            check_schema(self._file.schema_arrow, self.name)
            sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
            self._starts = np.cumsum([0] + sizes)
        return self._file

    def close(self):
        """Let go of the file (the stream has moved past it), so that removing it frees its space."""
        if self._file is not None:
            self._file.close()
        self._file, self._cached = None, (None, None)

    @property
    def num_rows(self):
        return int(self._open().metadata.num_rows)

    def count_rows(self):
        """num_rows, without downloading a Hub file that is not here yet (its footer alone)."""
        return self.hub.row_count(self.index) if self.hub and self._file is None else self.num_rows

    def check_size(self, g, row_len=None):
        """Refuse row group g, from the file's metadata alone, if it holds more tokens than its rows
        can: more than MAX_ROW_TOKENS a row, or (row_len known) more than row_len a row. A few KB of
        compressed parquet can otherwise unpack to gigabytes before a row's length is checked."""
        meta = self._file.metadata.row_group(g)
        column = next(meta.column(j) for j in range(meta.num_columns)
                      if meta.column(j).path_in_schema.split(".")[0] == "input_ids")
        most = meta.num_rows * (row_len or MAX_ROW_TOKENS)
        if column.num_values > most:
            rows = f"rows {self._starts[g]}-{self._starts[g + 1] - 1}"
            raise DataError(f"{self.name}: row group {g} ({rows}) holds {column.num_values:,} token ids in "
                            f"{meta.num_rows:,} rows, so a row has more than " +
                            (f"the {row_len} tokens the others have" if row_len else f"{MAX_ROW_TOKENS:,} tokens") +
                            "; it is not read (a damaged or hostile file)")

    def read(self, start, stop, columns=("input_ids",), row_len=None):
        """Rows [start, stop) as a pyarrow Table, reading only the row groups that hold them (each
        checked first: check_size)."""
        f, pieces = self._open(), []
        g = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            if self._cached[0] != (g, columns):
                self.check_size(g, row_len)
                try:
                    self._cached = ((g, columns), f.read_row_group(g, columns=list(columns)))
                except (pa.ArrowException, OSError) as e:  # a damaged data page
                    raise DataError(f"{self.name}: row group {g} (rows {self._starts[g]}-{self._starts[g + 1] - 1}) "
                                    f"cannot be read, the file is damaged ({_brief(e)}); write or download it "
                                    f"again") from None
            lo, hi = int(self._starts[g]), int(self._starts[g + 1])
            pieces.append(self._cached[1].slice(start - lo, min(stop, hi) - start))
            start, g = min(stop, hi), g + 1
        return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


class HubShards:
    """The shard files of one revision of a Hub dataset, each downloaded whole into a cache folder
    on this node (huggingface_hub's cache layout, in cache_dir or the Hugging Face cache).

    huggingface_hub takes a file lock around each download and moves finished files into place
    atomically, so the ranks of a node fetch each file once: the first to ask downloads it, the
    others wait on the lock and then open the same local file. The fetching rank (local rank 0)
    also asks for the next shard in a background thread while the current one trains, and removes
    the files it fetched once the run has passed them, while they take more than the disk budget."""

    def __init__(self, repo_id, revision, files, cache_dir=None):
        self.repo_id, self.revision, self.files, self.cache_dir = repo_id, revision, files, cache_dir
        self.local = {}  # index -> (path, bytes) of the files this process fetched and has not removed
        self.lock = threading.Lock()  # self.local is written by the background download too
        self.threads = {}  # index -> background download

    def name(self, i):
        return printable(f"datasets/{self.repo_id}/{self.files[i]}")

    def sweep(self, older_than_s=600):
        """Remove partial downloads left by killed processes (huggingface_hub removes its own on an
        error, not on a kill); one still growing is another process's download and stays."""
        from huggingface_hub.file_download import repo_folder_name
        folder = os.path.join(self.folder(), repo_folder_name(repo_id=self.repo_id, repo_type="dataset"), "blobs")
        for f in glob.glob(os.path.join(folder, "*.incomplete")):
            try:
                if time.time() - os.path.getmtime(f) > older_than_s:
                    os.remove(f)
            except FileNotFoundError:
                pass

    def folder(self):
        from huggingface_hub import constants
        return self.cache_dir or constants.HF_HUB_CACHE

    def refuse_shared_cache(self, rank, fetcher):
        """On several nodes, refuse a cache folder that two nodes share (a home folder's Hugging Face
        cache, often): each node's fetcher would download the same files and remove them under the
        other's readers. Each fetcher leaves a mark named for this run and its node; after a barrier,
        a fetcher that sees another node's mark says so, and every rank learns of it. Collective."""
        import torch.distributed as dist
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
        if not (dist.is_available() and dist.is_initialized()) or local_world in (0, dist.get_world_size()):
            return  # one node (or not launched by torchrun)
        nonce = [os.urandom(8).hex()]
        dist.broadcast_object_list(nonce, src=0)  # the same name for this run on every node
        mark, found = os.path.join(self.folder(), f".pico-node-{nonce[0]}-{rank // local_world}"), (0, None)
        if fetcher:
            try:
                os.makedirs(self.folder(), exist_ok=True)
                open(mark, "w").close()
            except OSError as e:  # every rank must still meet the others below
                found = (0, f"cannot write there ({e.strerror}); point data_cache_dir at a writable folder")
        dist.barrier()
        if fetcher and not found[1]:
            found = (len(glob.glob(os.path.join(self.folder(), f".pico-node-{nonce[0]}-*"))), None)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)  # (objects: any backend); every node has looked after it
        if fetcher and not found[1]:
            os.remove(mark)
        if problem := next((why for _, why in everyone if why), None):
            raise DataError(f"data_cache_dir {self.folder()}: {problem}")
        if max(n for n, _ in everyone) > 1:
            raise DataError(f"data_cache_dir {self.folder()} is shared by {max(n for n, _ in everyone)} nodes: each "
                            f"node's fetcher would download the same files and remove them while the other's ranks "
                            f"read them; set data_cache_dir to a folder on each node's own disk (e.g. /tmp/pico-data)")

    def fetch(self, i):
        """The local path of file i, downloaded first if this node does not have it yet."""
        from huggingface_hub import hf_hub_download
        try:
            path = _retry(lambda: hf_hub_download(self.repo_id, self.files[i], repo_type="dataset",
                                                  revision=self.revision, cache_dir=self.cache_dir),
                          f"downloading {self.name(i)}")
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DataError(f"downloading {self.name(i)}: no space left in {self.folder()} "
                            f"({e.strerror}); free some, point data_cache_dir at a larger disk, or lower "
                            f"data_cache_gb") from None
        with self.lock:
            self.local[i] = (path, os.path.getsize(path))
        return path

    def row_count(self, i):
        """File i's number of rows from its parquet footer alone: two ranged reads (the file's last 8
        bytes, then the footer) unless the file is here already, so that moving a position over
        files (TrainStream.skip) downloads none of them."""
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers
        with self.lock:
            here = self.local.get(i)
        if here:
            return pq.read_metadata(here[0]).num_rows
        url = hf_hub_url(self.repo_id, self.files[i], repo_type="dataset", revision=self.revision)

        def tail(n):  # the file's last n bytes
            r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes=-{n}"}, follow_redirects=True)
            r.raise_for_status()
            return r.content[-n:]
        end = _retry(lambda: tail(8), f"reading the footer of {self.name(i)}")
        if end[4:] != b"PAR1":
            raise DataError(f"{self.name(i)}: not a parquet file (it does not end in PAR1)")
        footer = _retry(lambda: tail(int.from_bytes(end[:4], "little") + 8), f"reading the footer of {self.name(i)}")
        try:
            return pq.read_metadata(pa.BufferReader(b"PAR1" + footer)).num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.name(i)}: a damaged parquet footer ({_brief(e)})") from None

    def path(self, i):
        """File i for reading now: waits for its background download if one is under way."""
        if i in self.threads:
            self.threads.pop(i).join()
        return self.fetch(i)

    def prefetch(self, i):
        """Start downloading file i in the background, unless it is here or on its way."""
        if i in self.local or i in self.threads:
            return

        def quietly():
            try:
                self.fetch(i)
            except Exception as e:  # noqa: BLE001 - path(i) fetches it again when it is needed, and says why it fails
                log.info("background download of %s failed (%s); it is tried again when needed", self.name(i), e)
        self.threads[i] = threading.Thread(target=quietly, name=f"prefetch-{i}", daemon=True)
        self.threads[i].start()

    def evict(self, first, last, budget):
        """Remove fetched files while they take more than `budget` bytes, keeping files first..last + 1
        (in the order of the data, wrapping at the end), the ones some rank may still read or is about
        to. The file needed again furthest in the future (the one just passed) goes first."""
        n, keep = len(self.files), {first}
        while first != (last + 1) % n:
            first = (first + 1) % n
            keep.add(first)
        with self.lock:
            local = dict(self.local)
        total = sum(size for _, size in local.values())
        for i in sorted(set(local) - keep - set(self.threads), key=lambda i: (i - last) % n, reverse=True):
            if total <= budget:
                break
            with self.lock:
                path, size = self.local.pop(i)
            doomed = [path]
            if os.path.islink(path):  # the snapshot's link, and the blob it points to (the cache's layout)
                doomed.append(os.path.join(os.path.dirname(path), os.readlink(path)))
            for f in doomed:
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass
            total -= size
            log.debug("removed %s from the data cache (%.1f MB)", self.name(i), size / 2**20)


class TableShard:
    """A memory-mapped Arrow table (a `Dataset.save_to_disk` folder)."""

    def __init__(self, name, table):
        self.name, self.table = name, table
        check_schema(table.schema, name)

    @property
    def num_rows(self):
        return self.table.num_rows

    def count_rows(self):
        return self.table.num_rows

    def close(self):
        pass  # memory-mapped: nothing to let go of

    def read(self, start, stop, columns=("input_ids",), row_len=None):
        return self.table.select(list(columns)).slice(start, stop - start)


def check_schema(schema, name):
    """Refuse a file whose input_ids column is missing or is not lists of integers (strings of
    text, or float ids that would be silently truncated)."""
    if "input_ids" not in schema.names:
        raise DataError(f"{name}: no 'input_ids' column (columns: {schema.names}); pico-train needs rows of "
                        f"token ids (python data.py tokenize makes them from text)")
    kind = schema.field("input_ids").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{name}: input_ids has type {kind}, expected lists of integer token ids"
                        + (" (text must be tokenized first: python data.py tokenize)" if pa.types.is_string(kind)
                           or pa.types.is_large_string(kind) else ""))


def _matches_split(relpath, split):
    """Does a file belong to a split? 'train' matches train.parquet, train-00001-of-00010.parquet,
    train/xyz.parquet, data/train-*.parquet."""
    parts = re.split(r"[/\\]", relpath)
    return any(p == split or re.match(rf"{re.escape(split)}([-_.]|$)", p) for p in parts)


def _pick_split(paths, split, where, strict=False):
    if split is None:
        return paths
    chosen = [p for p in paths if _matches_split(p, split)]
    if chosen:
        return chosen
    if strict:
        raise MissingSplit(f"{where}: no files for split {split!r}")
    if any(_matches_split(p, s) for p in paths for s in ("train", "validation", "val", "test")):
        raise MissingSplit(f"{where}: no files for split {split!r} among {paths[:6]}")
    return paths  # no split naming at all: the whole dataset is the one split


def hub_offline():
    """Is the Hugging Face Hub switched off (HF_HUB_OFFLINE set to a true value)?"""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_local(name):
    return os.path.exists(name) or any(c in name for c in "*?[") or name.startswith((".", "/", "~"))


def open_shards(name, split=None, strict=False, cache_dir=None):
    """Resolve a dataset name into an ordered list of shards.
    name: a local folder of parquet files, a glob of them, a Dataset.save_to_disk folder, or a
    Hugging Face Hub dataset id (e.g. pico-lm/pretokenized-dolma), whose files are downloaded whole
    into cache_dir (None: the Hugging Face cache) as they are read. A dataset whose files name no
    split at all is the one split of itself, unless strict."""
    if is_local(name):
        # a local path never needs the network; without this, datasets and huggingface_hub would
        # still try DNS lookups
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = os.path.expanduser(name)
        if os.path.isdir(path) and (os.path.exists(os.path.join(path, "state.json"))
                                    or os.path.exists(os.path.join(path, "dataset_dict.json"))):
            import datasets
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise MissingSplit(f"{name}: split {split!r} not found; splits: {list(ds)}")
                ds = ds[split]
            elif strict and split:
                raise MissingSplit(f"{name}: a single Dataset, with no split {split!r}")
            return [TableShard(name, ds.data.table)]
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            rel = [os.path.relpath(f, path) for f in files]
            files = [os.path.join(path, r) for r in _pick_split(rel, split, name, strict)]
        else:
            files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise DataError(f"{name}: no parquet files found (expected a folder or glob of .parquet "
                            f"files, or a Dataset.save_to_disk folder)")
        return [ParquetShard(f) for f in files]

    parent = os.path.dirname(os.path.expanduser(name))
    if parent and os.path.isdir(parent):  # data/dem0: a mistyped local path, not a Hub dataset
        close = difflib.get_close_matches(os.path.basename(name), os.listdir(parent), n=3, cutoff=0.5)
        raise DataError(f"{name}: no such file or folder in {parent}/"
                        + (f" (did you mean {', '.join(os.path.join(parent, c) for c in close)}?)" if close else ""))
    if hub_offline():
        raise DataError(f"{name!r} is a Hugging Face Hub dataset, but HF_HUB_OFFLINE is set (no network). "
                        f"Use the embedded corpus (python train.py config/demo.py) or point "
                        f"dataset_name at a local folder of parquet files.")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # a bar per shard download would flood the log
    # each file a blob of its own, not a link into huggingface_hub's store shared across repositories:
    # removing a passed file then frees its space and touches nothing another repository uses
    constants.HF_HUB_DISABLE_SHARED_BLOBS = True
    api = HfApi()
    no_network = (f"Could not reach the Hugging Face Hub at {constants.ENDPOINT}: is there no network? Train on "
                  f"the embedded corpus (python train.py config/demo.py), point dataset_name at a local folder "
                  f"of parquet files, or set HF_HUB_OFFLINE=1 to say you are offline.")
    try:  # the first contact with the Hub: no network shows here, so three tries (3 s), not six
        revision = _retry(lambda: api.dataset_info(name, expand=["sha"]).sha, f"listing files of {name} on the Hub",
                          3, hint=no_network)
    except RepositoryNotFoundError:
        raise DataError(f"{name}: no such dataset on the Hugging Face Hub ({constants.ENDPOINT}), and no "
                        f"local file or folder of that name") from None
    # every rank lists and downloads this one commit, even if the dataset changes during the run
    files = _retry(lambda: sorted(f.path for f in api.list_repo_tree(name, repo_type="dataset", revision=revision,
                                                                      recursive=True) if f.path.endswith(".parquet")),
                   f"listing files of {name} on the Hub")
    files = _pick_split(files, split, name, strict)
    if not files:
        raise DataError(f"{name}: the Hub dataset has no parquet files")
    shards = HubShards(name, revision, files, cache_dir)
    return [ParquetShard(shards.name(i), shards, i) for i in range(len(files))]


def held_out_split(name):
    """The split of a dataset held out for evaluation: 'validation' or 'val', whichever it has."""
    for split in ("validation", "val"):
        try:
            open_shards(name, split, strict=True)
            return split
        except MissingSplit:
            pass
    raise DataError(f"{name} has no 'validation' (or 'val') split to evaluate on: make one with `python data.py "
                    f"tokenize ... --val-every 20`, or set eval_dataset_name (and eval_dataset_split)")


# ----------------------------------------------------------------------------------------------
# the embedded demo corpus and bring-your-own text

def load_tokenizer(path=TOKENIZER_PATH):
    from tokenizers import Tokenizer
    if path == TOKENIZER_PATH and (digest := file_sha256(path)) != TOKENIZER_SHA256:
        raise DataError(f"{path}: sha256 {digest} is not the OLMo tokenizer's ({TOKENIZER_SHA256})")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions with serde's message
        raise DataError(f"{path} is not a tokenizer file that the tokenizers library reads ({str(e)[:200]}): set "
                        f"tokenizer_path to a tokenizer.json, or leave it None for the OLMo tokenizer") from None


def save_tokenizer(tokenizer, folder, max_seq_len):
    """tokenizer.json and the tokenizer_config.json with which transformers' AutoTokenizer reads it."""
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|padding|>", "model_max_length": max_seq_len}, f, indent=2)


def pack_documents(token_lists, row_len=ROW_LEN):
    """Concatenate documents, each followed by EOS, and cut the stream into rows of row_len tokens
    (the last, incomplete row is dropped), as pico-lm built pretokenized-dolma."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, EOS_TOKEN_ID)), dtype=np.int32)
    n = len(stream) // row_len
    return stream[:n * row_len].reshape(n, row_len)


def write_rows(path, ids, extra=None):
    """Write rows deterministically (same input, same pyarrow version -> same bytes)."""
    columns = {"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}
    columns.update({k: pa.array(v, type=pa.string()) for k, v in (extra or {}).items()})
    pq.write_table(pa.table(columns), path, compression="zstd", row_group_size=64,
                   write_statistics=False, use_dictionary=False)


def kjv_chapters(text):
    """Split `bible -p /usr/lib 'gen1:1-rev22:21'` output into one document per chapter:
    'Genesis 1' then one line per verse ('1 In the beginning ...'), wrapped lines joined."""
    docs, lines = [], text.split("\n")
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and (i == 0 or lines[i - 1] == "") and re.match(r"^\S.* \d+$", line):
            docs.append([line, ""])
        elif line.startswith(" "):
            docs[-1].append(line.strip())
        elif line:
            docs[-1][-1] += " " + line.strip()
    return ["\n".join(d).strip() + "\n" for d in docs]


DEMO_SOURCE = os.path.join(DEMO_DIR, "kjv.txt.xz")


def build_demo_corpus(out_dir=DEMO_DIR, source=DEMO_SOURCE):
    """The embedded corpus: the King James Bible (public domain), one document per chapter;
    every 20th chapter is held out for validation."""
    with lzma.open(source, "rt", encoding="utf-8") as f:
        chapters = kjv_chapters(f.read())
    tok = load_tokenizer()
    encoded = [e.ids for e in tok.encode_batch(chapters, add_special_tokens=False)]
    n_train, n_val = write_corpus(encoded, out_dir, tok, val_every=20, source="kjv")
    return {"chapters": len(chapters), "train_rows": n_train, "validation_rows": n_val}


def write_corpus(docs, out_dir, tok, val_every=0, row_len=ROW_LEN, source=None):
    """Pack token lists into train.parquet and, with every val_every-th document held out,
    validation.parquet (plus the decoded `text` of each row, and `source` if given).
    Returns (train rows, validation rows)."""
    held = [val_every > 0 and i % val_every == val_every - 1 for i in range(len(docs))]
    train = pack_documents([d for d, h in zip(docs, held, strict=True) if not h], row_len)
    val = pack_documents([d for d, h in zip(docs, held, strict=True) if h], row_len)
    if len(train) == 0:
        raise DataError(f"{len(docs)} documents hold fewer than {row_len} tokens: nothing to train on")
    os.makedirs(out_dir, exist_ok=True)
    write_rows(os.path.join(out_dir, "train.parquet"), train)
    if len(val):
        extra = {"text": tok.decode_batch([r.tolist() for r in val], skip_special_tokens=False)}
        if source:
            extra["source"] = [source] * len(val)
        write_rows(os.path.join(out_dir, "validation.parquet"), val, extra)
    return len(train), len(val)


def tokenize_files(paths, out_dir, row_len=ROW_LEN, val_every=0):
    """Bring your own corpus: each text file is one document, tokenized and packed as dolma was.
    Returns (train rows, validation rows)."""
    texts = []
    for p in paths:  # each checked before any is tokenized
        if not os.path.isfile(p):  # a folder, a missing file, a device such as /dev/zero
            raise DataError(f"{printable(p)}: not a regular file; give text files (a folder's: {printable(p)}/*.txt)")
        with open(p, "rb") as f:
            raw = f.read()
        if not raw.strip():
            raise DataError(f"{printable(p)}: the file is empty (or only white space): nothing to tokenize")
        if b"\0" in raw:
            raise DataError(f"{printable(p)}: holds NUL bytes, so it is not a text file")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{printable(p)}: not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}); "
                            f"convert it first, e.g. iconv -t UTF-8") from None
    tok = load_tokenizer()
    docs = [tok.encode(text, add_special_tokens=False).ids for text in texts]
    return write_corpus(docs, out_dir, tok, val_every, row_len)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-demo", help="rebuild the embedded demo corpus")
    b.add_argument("--out", default=DEMO_DIR)
    t = sub.add_parser("tokenize", help="tokenize text files (one document each) into parquet rows")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--row-len", type=int, default=ROW_LEN)
    t.add_argument("--val-every", type=int, default=0, help="hold out every n-th document")
    b = sub.add_parser("batch", help="write the global batch a run's step N -> N + 1 trains on, as a checkpoint's "
                                      "learning_dynamics/train_data")
    b.add_argument("run_dir")
    b.add_argument("--step", type=int, required=True)
    b.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "batch":
        import dynamics
        try:
            rows, used = global_batch(args.run_dir, args.step)
            dynamics.save_rows(rows, args.out, load_tokenizer(used.get("tokenizer_path") or TOKENIZER_PATH))
        except DataError as e:
            raise SystemExit(f"data error: {e}") from None
        print(f"step {args.step} -> {args.step + 1} of {args.run_dir} trains on {len(rows)} sequences of "
              f"{rows.shape[1]} tokens from {used['dataset_name']} ({used['dataset_split']}) -> {args.out}")
    elif args.cmd == "build-demo":
        print(json.dumps(build_demo_corpus(args.out)))
        for split in ("train", "validation"):
            path = os.path.join(args.out, f"{split}.parquet")
            print(f"{path}  {file_sha256(path)}  ({pq.ParquetFile(path).metadata.num_rows} rows)")
    else:
        try:
            n_train, n_val = tokenize_files(args.files, args.out, args.row_len, args.val_every)
        except DataError as e:
            raise SystemExit(f"data error: {e}") from None
        print(f"{n_train} train rows -> {os.path.join(args.out, 'train.parquet')}")
        print(f"{n_val} validation rows -> {os.path.join(args.out, 'validation.parquet')}" if n_val else
              "0 validation rows: nothing held out (--val-every N holds out every n-th file), so set "
              "eval_dataset_name when you train on it")
