"""MixtureStream: round trip, exact resume (workers, world size), stage-boundary mixing, bad data, HTTP shards."""
import functools
import http.server
import io
import math
import os
import tarfile
import threading

import numpy as np
import pytest
import torch

from components.data.loader import StreamLoader
from components.data.sequence import SetLayout
from components.data.shards import build_shards
from components.data.stream import MixtureStream
from components.data.tokenizer import load_tokenizer, train_bpe
from components.schedule import Stage, StageSchedule

SEQ = 16
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def english_docs(n):
    return [f"Doc {i}. " + " ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(30 + i % 11)) + "."
            for i in range(n)]


def code_docs(n):
    return [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for name, docs in (("english", english_docs(60)), ("code", code_docs(80))):
        (root / "raw" / name).mkdir(parents=True)
        for i, doc in enumerate(docs):
            (root / "raw" / name / f"{i:03d}.txt").write_text(doc)
    train_bpe(english_docs(60) + code_docs(80), vocab_size=300, out_dir=root / "tok")
    for name in ("english", "code"):
        build_shards([str(root / "raw" / name)], root / name, root / "tok", seq_len=SEQ, shard_samples=20, seed=1)
    return root


def sets_of(root):
    return {"english": str(root / "english"), "code": str(root / "code")}


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_build_stream_decode_round_trips_the_text(data):
    tok = load_tokenizer(data / "tok")
    stream = MixtureStream({"english": str(data / "english")}, {"english": 1.0}, num_streams=1,
                           stop_samples=10**9, tokenizer_fingerprint=tok.fingerprint)
    n = stream.sets[0].manifest["samples"]
    stream.stop_samples = n  # one epoch
    items = sorted(stream, key=lambda it: it["sample_id"])
    assert [it["sample_id"] for it in items] == list(range(n))
    tokens = torch.cat([torch.cat([it["input_ids"][:1], it["targets"]]) for it in items]).tolist()
    docs = [(data / "raw" / "english" / f"{i:03d}.txt").read_text() for i in range(60)]
    text = "".join(doc + "<|endoftext|>" for doc in docs)
    assert all(torch.equal(it["input_ids"][1:], it["targets"][:-1]) for it in items)
    assert tok.decode(tokens) == text[: len(tok.decode(tokens))]
    assert len(text) - len(tok.decode(tokens)) < 4 * (SEQ + 1)  # only the last partial sample is missing


def test_resume_with_two_workers_continues_exactly(data):
    def loader(consumed=0):
        stream = MixtureStream(sets_of(data), {"english": 0.6, "code": 0.4}, num_workers=2, micro_batch_size=4,
                               num_streams=48, seed=7, consumed_samples=consumed)
        return StreamLoader(stream)

    straight = take(loader(), 40)  # 160 samples: more than one epoch of each set
    take(loader(), 15)
    resumed = take(loader(15 * 4), 25)  # the position after 15 micro-batches of 4 on one rank
    for a, b in zip(straight[15:], resumed):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert {int(s) for b in straight for s in b["set_id"]} == {0, 1}


def identities(batches):
    return [(int(i), int(s), int(k)) for b in batches for i, s, k in zip(b["index"], b["set_id"], b["sample_id"])]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 2-core CI machine
def test_world_size_two_then_three_repeats_nothing_and_skips_nothing(data):
    def rank_loader(rank, world, consumed, workers=2):
        stream = MixtureStream(sets_of(data), {"english": 0.5, "code": 0.5}, rank=rank, world_size=world,
                               num_workers=workers, micro_batch_size=4, num_streams=48, seed=3,
                               consumed_samples=consumed)
        return StreamLoader(stream)

    before = [rank_loader(r, 2, 0) for r in range(2)]
    seen = [x for lo in before for x in identities(take(lo, 5))]
    consumed = 5 * 4 * 2  # 5 micro-batches of 4 on each of 2 ranks
    after = [rank_loader(r, 3, consumed) for r in range(3)]
    seen += [x for lo in after for x in identities(take(lo, 6))]
    consumed += 6 * 4 * 3
    single = rank_loader(0, 1, consumed, workers=3)           # and then one rank with three workers
    seen += identities(take(single, 5))
    indices = [i for i, _, _ in seen]
    assert len(indices) == len(set(indices))                  # nothing repeated
    assert sorted(indices) == list(range(consumed + 5 * 4))   # nothing skipped
    reference = MixtureStream(sets_of(data), {"english": 0.5, "code": 0.5}, num_streams=48, seed=3,
                              stop_samples=len(indices))
    assert sorted(seen) == [(it["index"], it["set_id"], it["sample_id"]) for it in reference]


def test_mixture_switches_exactly_at_the_stage_token_boundary(data):
    boundary = 10 * SEQ + 5  # sample 10 starts at token 160 < boundary; sample 11 starts at 176 >= boundary
    schedule = StageSchedule([
        Stage("main", boundary, "constant", 1.0, 1.0, 8, {"english": 1.0}),
        Stage("cooldown", 10_000, "constant", 1.0, 1.0, 8, {"code": 1.0}),
    ], seq_len=SEQ)
    for consumed in (0, 9):
        stream = MixtureStream(sets_of(data), schedule, num_workers=2, micro_batch_size=2, world_size=2, rank=1,
                               num_streams=8, consumed_samples=consumed)
        got = {i: s for i, s, _ in identities(take(StreamLoader(stream), 6))}
        assert got and all(s == (0 if i <= 10 else 1) for i, s in got.items())
        assert min(got) <= 10 < max(got)


def test_truncated_shard_streams_to_the_end_and_counts_exactly_the_lost(data, tmp_path):
    import shutil

    shutil.copytree(data / "english", tmp_path / "english")
    victim = tmp_path / "english" / "shard-000002.tar"
    member = 512 + 512  # ustar header + (SEQ+1)*2 = 34 bytes of data padded to a block
    victim.write_bytes(victim.read_bytes()[: 5 * member + 100])
    stream = MixtureStream({"english": str(tmp_path / "english")}, {"english": 1.0}, num_streams=4,
                           micro_batch_size=2)
    manifest = stream.sets[0].manifest
    stream.stop_samples = 2 * manifest["samples"]  # two epochs' worth of positions
    layout = SetLayout("english", [s["samples"] for s in manifest["shards"]], num_streams=4, seed=0)
    where = [layout.locate(i % 4, i // 4)[1:] for i in range(stream.stop_samples)]
    lost = sum(1 for shard, offset in where if shard == 2 and offset >= 5)  # 5 whole samples survive the cut
    assert lost == 2 * (manifest["shards"][2]["samples"] - 5)
    batches = list(StreamLoader(stream))
    yielded = identities(batches)
    assert len(batches) == stream.stop_samples // 2  # every micro-batch of the order, empty ones included
    assert sum(int(b["lost_samples"]) for b in batches) == lost
    assert sum(int(b["bad_shards"]) for b in batches) >= 1  # counted once per load of the shard
    assert len(yielded) == stream.stop_samples - lost
    assert len({(s, k) for _, s, k in yielded}) == manifest["samples"] - lost // 2


@pytest.mark.parametrize("world,workers,consumed", [(2, 0, 0), (3, 2, 3)])
def test_a_bounded_stream_gives_every_rank_the_same_number_of_micro_batches(data, world, workers, consumed):
    """17 held-out samples over ranks of micro-batches of 4: rank 0's share is the longest; the others end with
    empty micro-batches (an FSDP2 forward all-gathers, so every rank must run as many). Each sample once."""
    stop, b = 17, 4
    loaders = [StreamLoader(MixtureStream(sets_of(data), {"english": 1.0}, rank=r, world_size=world,
                                          num_workers=workers, micro_batch_size=b, num_streams=24,
                                          consumed_samples=consumed, stop_samples=stop)) for r in range(world)]
    batches = [list(loader) for loader in loaders]
    total = math.ceil(math.ceil((stop - consumed) / world) / b)  # the first index's rank: 9 (world 2) or 5 samples
    assert [len(rank) for rank in batches] == [total] * world
    assert loaders[1].stream.micro_batches_per_rank() == total
    assert sorted(i for rank in batches for i, _, _ in identities(rank)) == list(range(consumed, stop))
    padding = [m for rank in batches for m in rank if len(m["index"]) == 0]
    assert padding, "this layout has a rank with a shorter share"
    reference = batches[0][0]
    for m in padding:
        assert m.keys() == reference.keys()
        assert m["input_ids"].shape == (0, SEQ) and m["input_ids"].dtype == reference["input_ids"].dtype
        assert m["targets"].shape == (0, SEQ) and int(m["lost_samples"]) == int(m["bad_shards"]) == 0


def test_resume_stays_exact_across_lost_samples(data, tmp_path):
    import shutil

    shutil.copytree(data / "code", tmp_path / "code")
    victim = tmp_path / "code" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:4000])

    def loader(consumed=0):
        return StreamLoader(MixtureStream({"code": str(tmp_path / "code")}, {"code": 1.0}, num_workers=2,
                                          micro_batch_size=4, num_streams=8, consumed_samples=consumed))

    straight = take(loader(), 30)
    resumed = take(loader(11 * 4), 19)  # the position after 11 micro-batches of 4
    assert identities(resumed) == identities(straight[11:])
    assert sum(len(b["index"]) for b in straight) < 30 * 4  # some samples were lost on the way
    # Each micro-batch counts its own lost samples (a worker's read-ahead used to put a whole group's on its first
    # micro-batch: reported steps early, and a resume counted again what the checkpoint already held).
    assert [int(b["lost_samples"]) for b in straight] == [4 - len(b["index"]) for b in straight]
    assert [int(b["lost_samples"]) for b in resumed] == [4 - len(b["index"]) for b in straight[11:]]


def test_wrong_length_sample_and_missing_shard_are_counted(data, tmp_path):
    import shutil

    shutil.copytree(data / "code", tmp_path / "code")
    shard = tmp_path / "code" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[3] = (members[3][0], members[3][1][:-2])  # one token short
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard.write_bytes(buf.getvalue())
    stream = MixtureStream({"code": str(tmp_path / "code")}, {"code": 1.0}, num_streams=1, micro_batch_size=5)
    manifest = stream.sets[0].manifest
    os.remove(tmp_path / "code" / "shard-000004.tar")  # disappears after the start-up check
    stream.stop_samples = manifest["samples"]
    batches = list(StreamLoader(stream))
    count = sum(len(b["index"]) for b in batches)
    lost = 1 + manifest["shards"][4]["samples"]
    assert sum(int(b["lost_samples"]) for b in batches) == lost
    assert sum(int(b["bad_shards"]) for b in batches) == 2
    assert count == manifest["samples"] - lost


def test_start_up_errors_are_clear(data, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        MixtureStream(sets_of(data), {"english": 1.0}, tokenizer_fingerprint="0" * 64)
    shutil.copytree(data / "code", tmp_path / "code")
    os.remove(tmp_path / "code" / "shard-000000.tar")
    with pytest.raises(ValueError, match=r"shard set 'code': 1 shard file\(s\) listed in the manifest do not exist"):
        MixtureStream({"code": str(tmp_path / "code")}, {"code": 1.0})
    with pytest.raises(ValueError, match="no manifest.json"):
        MixtureStream({"x": str(tmp_path)}, {"x": 1.0})
    with pytest.raises(ValueError, match=r"num_streams=40 must be a multiple of .* = 3\*2\*4 = 24"):
        MixtureStream(sets_of(data), {"code": 1.0}, world_size=3, num_workers=2, micro_batch_size=4, num_streams=40)
    with pytest.raises(ValueError, match=r"must be a non-empty mapping \{name: location\}"):
        MixtureStream([str(data / "code")], {"code": 1.0})
    with pytest.raises(ValueError, match=r"rank=2 must be < world_size=2"):
        MixtureStream(sets_of(data), {"code": 1.0}, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"names shard sets \['math'\]"):
        MixtureStream(sets_of(data), {"math": 1.0})
    stream = MixtureStream(sets_of(data), {"code": 1.0}, num_workers=0, micro_batch_size=2, num_streams=4)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=2, num_workers=1))
    with pytest.raises(ValueError, match="built for num_workers=0 but the DataLoader runs 1"):
        next(batches)
    batches._shutdown_workers()


@pytest.fixture()
def http_root(data):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_stream_the_same_samples_as_local(data, http_root):
    remote = {name: f"{http_root}/{name}" for name in ("english", "code")}
    kwargs = dict(num_workers=2, micro_batch_size=4, num_streams=16, seed=5, stop_samples=120)
    over_http = [b for b in StreamLoader(MixtureStream(remote, {"english": 0.5, "code": 0.5}, **kwargs))]
    local = [b for b in StreamLoader(MixtureStream(sets_of(data), {"english": 0.5, "code": 0.5}, **kwargs))]
    assert identities(over_http) == identities(local) and len(identities(local)) == 120
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(over_http, local))
    with pytest.raises(ValueError, match="no manifest.json"):
        MixtureStream({"gone": f"{http_root}/nothing-here"}, {"gone": 1.0})


def test_virtual_stream_reads_contiguous_runs(data):
    """With N >= V, each virtual stream reads one contiguous block of its set per epoch (shard locality)."""
    from components.data.sequence import SetLayout

    layout = SetLayout("english", [20] * 10, num_streams=4, seed=0)
    positions = [layout.set_position(1, k) for k in range(100)]
    assert positions[:50] == list(range(50, 100)) and positions[50:] == list(range(250, 300))
    epochs = {layout.locate(1, k)[0] for k in range(100)}
    assert epochs == {0, 1} and np.unique([layout.locate(1, k)[1] for k in range(50)]).size <= 4


@pytest.mark.parametrize("context", [None, "spawn"])
def test_worker_ring_delivers_every_uint32_row_once_as_int32(tmp_path, context):
    """Tokens above 65535 (uint32 shards), groups that do not divide the pass, fork and spawn workers: the shared
    ring hands over every sample exactly once, unchanged, with targets the next tokens. (192 = num_streams x 3:
    one pass of the stream is then exactly one epoch of the set.)"""
    from components.data.shards import write_shards

    samples = np.random.default_rng(0).integers(0, 163_840, size=(192, SEQ + 1), dtype=np.uint32)
    info = {"tokenizer": {"backend": "synthetic", "fingerprint": "x", "vocab_size": 163_840, "eos_id": 0,
                          "bos_id": None}}
    write_shards(samples, tmp_path / "set", seed=0, shard_samples=32, name="set", info=info)
    stream = MixtureStream({"set": str(tmp_path / "set")}, {"set": 1.0}, micro_batch_size=4, num_workers=2,
                           num_streams=64, stop_samples=192)
    loader = StreamLoader(stream, group=3, multiprocessing_context=context)
    batches = list(loader)
    assert all(b["input_ids"].dtype == torch.int32 for b in batches)
    tokens = torch.cat([torch.cat([b["input_ids"], b["targets"][:, -1:]], dim=1) for b in batches])
    assert all(torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1]) for b in batches)
    assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, samples.astype(np.int64).tolist()))
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(192))
    assert sum(int(b["lost_samples"]) + int(b["bad_shards"]) for b in batches) == 0


def test_one_sample_micro_batches_keep_their_own_indices(tmp_path):
    """group=1, micro_batch_size=1: every group is a single row, whose small fields must still be copied out of
    the ring slot that the worker writes again."""
    from components.data.shards import write_shards

    samples = np.arange(64 * (SEQ + 1), dtype=np.uint16).reshape(64, SEQ + 1)
    info = {"tokenizer": {"backend": "synthetic", "fingerprint": "x", "vocab_size": 65536, "eos_id": 0,
                          "bos_id": None}}
    write_shards(samples, tmp_path / "set", seed=0, shard_samples=8, name="set", info=info)
    stream = MixtureStream({"set": str(tmp_path / "set")}, {"set": 1.0}, micro_batch_size=1, num_workers=2,
                           num_streams=64, stop_samples=64)
    batches = list(StreamLoader(stream, group=1))
    assert [int(b["index"]) for b in batches] == list(range(64))
    for b in batches:  # the sample id names the row the tokens came from
        assert int(b["input_ids"][0, 0]) == int(b["sample_id"]) * (SEQ + 1)


def test_running_out_of_file_descriptors_is_an_error_not_lost_data(tmp_path, monkeypatch):
    import errno

    from components.data import remote
    from components.data.shards import write_shards

    samples = np.zeros((16, SEQ + 1), dtype=np.uint16)
    info = {"tokenizer": {"backend": "synthetic", "fingerprint": "x", "vocab_size": 100, "eos_id": 0,
                          "bos_id": None}}
    write_shards(samples, tmp_path / "set", seed=0, shard_samples=8, name="set", info=info)

    def exhausted(url):
        raise OSError(errno.EMFILE, "Too many open files")

    stream = MixtureStream({"set": str(tmp_path / "set")}, {"set": 1.0}, micro_batch_size=4, num_streams=4,
                           stop_samples=16)
    monkeypatch.setattr(remote, "map_or_read", exhausted)  # after the manifest was read
    with pytest.raises(OSError, match="Too many open files"):
        list(StreamLoader(stream))


def test_memory_maps_are_capped_and_the_rest_is_read(tmp_path, monkeypatch):
    """Each map holds a file descriptor: past remote.MAX_MAPPED live maps, shards are read instead, with the same
    samples."""
    from components.data import remote
    from components.data.shards import write_shards

    samples = np.random.default_rng(1).integers(0, 1000, size=(96, SEQ + 1), dtype=np.uint16)
    info = {"tokenizer": {"backend": "synthetic", "fingerprint": "x", "vocab_size": 1000, "eos_id": 0,
                          "bos_id": None}}
    write_shards(samples, tmp_path / "set", seed=0, shard_samples=4, name="set", info=info)  # 24 shards

    def run():
        stream = MixtureStream({"set": str(tmp_path / "set")}, {"set": 1.0}, micro_batch_size=4, num_streams=24,
                               stop_samples=96)
        out, most = [], 0
        for batch in StreamLoader(stream):
            out.append(batch["input_ids"].clone())
            most = max(most, remote.mapped_count())
        return torch.cat(out), most

    unlimited, most_unlimited = run()
    monkeypatch.setattr(remote, "MAX_MAPPED", 2)
    capped, most_capped = run()
    assert most_unlimited > 2 and most_capped <= 2
    assert torch.equal(capped, unlimited)


def test_the_data_order_is_equal_exactly_when_the_consumed_samples_come_out_the_same(data):
    # What a checkpoint records about its consumed samples (components/data/stream.data_order) against the truth:
    # the first n samples each configuration's stream yields. A resume compares the two records.
    from components.data.stream import data_order, data_order_changes

    n, boundary = 40, 30 * SEQ  # the second stage starts at sample 30: inside the consumed samples

    def schedule(first, second, cooldown_start=50 * SEQ):
        return StageSchedule([Stage("main", boundary, "constant", 1.0, 1.0, 8, first),
                              Stage("mix", cooldown_start, "constant", 1.0, 1.0, 8, second),
                              Stage("cooldown", 10_000, "constant", 1.0, 1.0, 8, {"code": 1.0})], seq_len=SEQ)

    base = {"sets": sets_of(data), "mixture": schedule({"english": 1.0}, {"english": 0.6, "code": 0.4}),
            "num_streams": 48, "seed": 7}
    variants = {
        "unchanged": {},
        "a later stage's mixture": {"mixture": schedule({"english": 1.0}, {"english": 0.6, "code": 0.4},
                                                        cooldown_start=60 * SEQ)},
        "the current stage's mixture": {"mixture": schedule({"english": 1.0}, {"english": 0.5, "code": 0.5})},
        "the sets' order": {"sets": dict(reversed(list(sets_of(data).items())))},
        "num_streams": {"num_streams": 96},
        "seed": {"seed": 8},
    }

    def first_samples(config):
        stream = MixtureStream(config["sets"], config["mixture"], num_streams=config["num_streams"],
                               seed=config["seed"], stop_samples=n)
        return [it["input_ids"].tolist() for it in stream]

    def order(config):
        return data_order(config["sets"], config["mixture"], seq_len=SEQ, num_streams=config["num_streams"],
                          seed=config["seed"], consumed_samples=n)

    reference, reference_order = first_samples(base), order(base)
    for what, change in variants.items():
        config = {**base, **change}
        same_samples = first_samples(config) == reference
        assert same_samples == (what in ("unchanged", "a later stage's mixture")), what
        assert (order(config) == reference_order) == same_samples, what
        assert bool(data_order_changes(reference_order, order(config))) == (not same_samples), what
    assert data_order_changes(reference_order, order({**base, "num_streams": 96})) == ["data.num_streams: 48 -> 96"]
