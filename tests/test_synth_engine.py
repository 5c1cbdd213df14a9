"""The synthesis engine with a fast fake generator: layout, CSV, manifest, resume, sharding, black images."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from gift_fast.synth.engine import (SynthError, load_task_file, read_image_meta, synthesize_sequence,
                                    synthesize_task)
from gift_fast.synth.prompts import image_seed, sample_prompts


class FakeGenerator:
    """Image k is a pure function of (prompts[k], seeds[k]); black when the seed is in ``black_seeds``."""

    name = "fake"

    def __init__(self, size=8, black_seeds=(), fail_after_calls=None, tag="v1"):
        self.size = size
        self.black_seeds = set(black_seeds)
        self.calls = []
        self.fail_after_calls = fail_after_calls
        self.tag = tag

    def generate(self, prompts, seeds):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(list(seeds))
        out = []
        for p, s in zip(prompts, seeds):
            if s in self.black_seeds:
                out.append(Image.new("RGB", (self.size, self.size)))
                continue
            rng = np.random.default_rng([s % (2 ** 32), s >> 32, len(p)])
            out.append(Image.fromarray(rng.integers(1, 256, (self.size, self.size, 3), dtype=np.uint8)))
        return out

    def describe(self):
        return {"name": "fake", "config": {"size": self.size, "tag": self.tag}, "runtime": {"threads": 1}}

    def seeds_seen(self):
        return [s for c in self.calls for s in c]


def _run(gen, root, n=10, **kw):
    prompts = sample_prompts(["cat", "dog", "fish", "owl"], n, seed=kw.get("seed", 7), task_index=kw.get("task_index", 0))
    args = dict(seed=7, task_index=0, batch_size=4, progress=False)
    args.update(kw)
    return synthesize_task(gen, "Birds", prompts, root, **args), prompts


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".jpeg", ".png")}


def _index_of_seed(seed, task_index, n, attempts=3):
    return {image_seed(seed, task_index, i, a): (i, a) for i in range(n) for a in range(attempts)}


def test_layout_csv_and_manifest(tmp_path):
    gen = FakeGenerator()
    folder, prompts = _run(gen, tmp_path, n=10)
    assert folder == tmp_path / "Birds_Syn"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i}.jpeg" for i in range(10)] + ["image_text.csv", "manifest.json"])
    with open(folder / "image_text.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "text"]
    assert rows[1:] == [[f"{i}.jpeg", p] for i, p in enumerate(prompts)]
    for i in range(10):
        with Image.open(folder / f"{i}.jpeg") as im:
            assert im.format == "JPEG" and im.size == (8, 8)
        meta = read_image_meta(folder / f"{i}.jpeg", decode=True)
        assert meta["i"] == i and meta["prompt"] == prompts[i] and meta["attempt"] == 0
        assert meta["seed"] == image_seed(7, 0, i)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["complete"] and m["images"] == 10 and m["seed"] == 7 and m["task"] == "Birds"
    assert m["identity"]["generator"] == {"name": "fake", "config": {"size": 8, "tag": "v1"}}
    assert m["counts"]["black_regenerations"] == 0 and m["retries"] == {}
    assert m["last_run"]["generated"] == 10 and m["last_run"]["skipped_valid"] == 0
    assert "versions" in m and m["versions"]["PIL"]
    # one seed per image, in index order, batches of 4
    assert [len(c) for c in gen.calls] == [4, 4, 2]
    assert gen.seeds_seen() == [image_seed(7, 0, i) for i in range(10)]
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_png_format(tmp_path):
    folder, _ = _run(FakeGenerator(), tmp_path, n=3, image_format="png")
    assert sorted(p.name for p in folder.glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert read_image_meta(folder / "1.png", decode=True)["i"] == 1
    assert "0.png" in (folder / "image_text.csv").read_text()


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_files_do_not_depend_on_batch_size(tmp_path, batch_size):
    ref, _ = _run(FakeGenerator(), tmp_path / "ref", n=9, batch_size=4)
    got, _ = _run(FakeGenerator(), tmp_path / "got", n=9, batch_size=batch_size)
    assert _files(ref) == _files(got)
    assert (ref / "image_text.csv").read_bytes() == (got / "image_text.csv").read_bytes()


def test_resume_skips_valid_and_regenerates_missing_and_corrupt(tmp_path):
    folder, prompts = _run(FakeGenerator(size=64), tmp_path, n=12)
    before = _files(folder)
    (folder / "2.jpeg").unlink()                                        # missing
    data = (folder / "5.jpeg").read_bytes()
    assert len(data) > 2500
    (folder / "5.jpeg").write_bytes(data[: len(data) * 4 // 5])         # truncated inside the image data
    (folder / "7.jpeg").write_bytes(b"not an image at all")            # garbage
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "9.jpeg")         # a valid JPEG without provenance
    (folder / ".3.jpeg.tmp-1-2").write_bytes(b"half")                   # a killed run's temp file
    gen = FakeGenerator(size=64)
    _run(gen, tmp_path, n=12)
    idx = _index_of_seed(7, 0, 12)
    assert sorted(idx[s][0] for s in gen.seeds_seen()) == [2, 5, 7, 9]
    assert _files(folder) == before
    assert not (folder / ".3.jpeg.tmp-1-2").exists()
    m = json.loads((folder / "manifest.json").read_text())
    assert m["last_run"]["generated"] == 4 and m["last_run"]["skipped_valid"] == 8
    # nothing to do: no generator call, CSV still there
    gen2 = FakeGenerator(size=64)
    _run(gen2, tmp_path, n=12)
    assert gen2.calls == [] and (folder / "image_text.csv").exists()


def test_interrupted_run_leaves_no_csv_and_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(FakeGenerator(fail_after_calls=2), tmp_path, n=10)
    folder = tmp_path / "Birds_Syn"
    assert not (folder / "image_text.csv").exists()
    assert sorted(p.name for p in folder.glob("*.jpeg")) == [f"{i}.jpeg" for i in range(8)]
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    gen = FakeGenerator()
    _run(gen, tmp_path, n=10)
    assert gen.seeds_seen() == [image_seed(7, 0, 8), image_seed(7, 0, 9)]
    assert (folder / "image_text.csv").exists()
    ref, _ = _run(FakeGenerator(), tmp_path / "ref", n=10)
    assert _files(ref) == _files(folder)


def test_growing_a_task_keeps_the_first_images(tmp_path):
    _run(FakeGenerator(), tmp_path, n=5)
    gen = FakeGenerator()
    folder, prompts = _run(gen, tmp_path, n=8)
    assert gen.seeds_seen() == [image_seed(7, 0, i) for i in (5, 6, 7)]
    assert len(list(csv.reader(open(folder / "image_text.csv")))) == 9


def test_other_config_in_the_folder_is_refused_unless_overwrite(tmp_path):
    folder, _ = _run(FakeGenerator(tag="v1"), tmp_path, n=4)
    with pytest.raises(SynthError, match=r"another configuration.*config\.tag: 'v1' there, 'v2' now"):
        _run(FakeGenerator(tag="v2"), tmp_path, n=4)
    with pytest.raises(SynthError, match="seed: 7 there, 8 now"):
        _run(FakeGenerator(tag="v1"), tmp_path, n=4, seed=8)
    gen = FakeGenerator(tag="v2")
    _run(gen, tmp_path, n=4, overwrite=True)
    assert len(gen.seeds_seen()) == 4  # every image regenerated under the new config
    assert json.loads((folder / "manifest.json").read_text())["identity"]["generator"]["config"]["tag"] == "v2"
    gen = FakeGenerator(tag="v2")
    _run(gen, tmp_path, n=4, overwrite=True)  # a resumed overwrite run keeps what already matches
    assert gen.calls == []


def test_black_images_are_regenerated_with_the_next_seed_and_counted(tmp_path):
    black = {image_seed(7, 0, 1, 0), image_seed(7, 0, 3, 0), image_seed(7, 0, 3, 1), image_seed(7, 0, 6, 0),
             image_seed(7, 0, 6, 1), image_seed(7, 0, 6, 2)}
    gen = FakeGenerator(black_seeds=black)
    folder, prompts = _run(gen, tmp_path, n=8, max_retries=2)
    idx = _index_of_seed(7, 0, 8, attempts=3)
    seen = [idx[s] for s in gen.seeds_seen()]
    assert (1, 1) in seen and (3, 1) in seen and (3, 2) in seen and (6, 2) in seen
    assert all(len(c) <= 4 for c in gen.calls)
    # retries join the next batch: the second call starts with image 1's and 3's second attempts
    assert [idx[s] for s in gen.calls[1][:2]] == [(1, 1), (3, 1)]
    metas = {i: read_image_meta(folder / f"{i}.jpeg", decode=True) for i in range(8)}
    assert metas[1]["attempt"] == 1 and metas[1]["seed"] == image_seed(7, 0, 1, 1)
    assert metas[3]["attempt"] == 2 and "black" not in metas[3]
    assert metas[6]["attempt"] == 2 and metas[6]["black"] is True  # still black after max_retries: kept
    with Image.open(folder / "6.jpeg") as im:
        assert max(hi for _, hi in im.getextrema()) <= 2
    m = json.loads((folder / "manifest.json").read_text())
    assert m["retries"] == {"1": 1, "3": 2, "6": 2}
    assert m["counts"]["black_regenerated_images"] == 3 and m["counts"]["black_regenerations"] == 5
    assert m["counts"]["black_kept"] == 1
    # a resume keeps retried images (their seeds follow the rule) and does not redo them
    gen2 = FakeGenerator(black_seeds=black)
    _run(gen2, tmp_path, n=8, max_retries=2)
    assert gen2.calls == []


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ranks_cover_each_index_once_and_match_one_process(tmp_path, world):
    n = 11
    gens = []
    for rank in range(world):
        gen = FakeGenerator()
        folder, prompts = _run(gen, tmp_path / "sharded", n=n, rank=rank, world_size=world, batch_size=2)
        gens.append(gen)
        # the CSV appears only once every rank is done
        assert (folder / "image_text.csv").exists() == (rank == world - 1)
    idx = _index_of_seed(7, 0, n)
    per_rank = [sorted(idx[s][0] for s in g.seeds_seen()) for g in gens]
    assert per_rank == [list(range(r, n, world)) for r in range(world)]
    flat = [i for r in per_rank for i in r]
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n
    ref, _ = _run(FakeGenerator(), tmp_path / "single", n=n)
    assert _files(ref) == _files(tmp_path / "sharded" / "Birds_Syn")
    assert (ref / "image_text.csv").read_bytes() == (tmp_path / "sharded/Birds_Syn/image_text.csv").read_bytes()


def test_bad_arguments_and_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SynthError, match="not writable"):
        synthesize_task(FakeGenerator(), "T", ["p"], blocker / "sub", seed=0, task_index=0, progress=False)
    with pytest.raises(ValueError, match="cannot name a folder"):
        synthesize_task(FakeGenerator(), "a/b", ["p"], tmp_path, seed=0, task_index=0)
    with pytest.raises(TypeError, match="not an ImageGenerator"):
        synthesize_task(object(), "T", ["p"], tmp_path, seed=0, task_index=0)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        synthesize_task(FakeGenerator(), "T", ["p"], tmp_path, seed=0, task_index=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown image format"):
        synthesize_task(FakeGenerator(), "T", ["p"], tmp_path, seed=0, task_index=0, image_format="gif")
    with pytest.raises(ValueError, match="batch_size"):
        synthesize_task(FakeGenerator(), "T", ["p"], tmp_path, seed=0, task_index=0, batch_size=0)

    class Wrong(FakeGenerator):
        def generate(self, prompts, seeds):
            return super().generate(prompts, seeds)[:-1]

    with pytest.raises(TypeError, match="list of 2 PIL images"):
        synthesize_task(Wrong(), "T", ["p", "q"], tmp_path, seed=0, task_index=0, progress=False)


def test_sequence_pools_prompts_only_and_run_manifest(tmp_path):
    tasks = [("A", ["a1", "a2"]), ("B", ["b1"]), ("C", ["c1", "c2", "c3"])]
    base = ["x", "y"]
    man = synthesize_sequence(FakeGenerator(), tasks, tmp_path / "all", images_per_task=40, seed=3,
                              base_classnames=base, batch_size=16, progress=False)

    def names(task):
        rows = list(csv.reader(open(tmp_path / "all" / f"{task}_Syn" / "image_text.csv")))[1:]
        return [r[1][len("a photo of a "):-1] for r in rows]

    assert set(names("A")) <= {"x", "y"}
    assert set(names("B")) <= {"x", "y", "a1", "a2"} and set(names("B")) & {"a1", "a2"}
    assert set(names("C")) <= {"x", "y", "a1", "a2", "b1"} and "b1" in names("C")
    assert man["order"] == ["A", "B", "C"] and man["seed"] == 3 and man["images_per_task"] == 40
    assert man["counts"]["tasks_complete"] == 3 and man["counts"]["images"] == 120
    assert man["tasks"]["C"]["pool_size"] == 5 and man["tasks"]["C"]["task_index"] == 2
    on_disk = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert on_disk["tasks"].keys() == {"A", "B", "C"} and on_disk["base_classnames"].startswith("custom")
    assert "wall_time_s" in on_disk and on_disk["generator"] == "fake"
    # only C: its pool still holds A and B, so its prompts are the same as in the full run
    synthesize_sequence(FakeGenerator(), tasks, tmp_path / "onlyC", images_per_task=40, seed=3,
                        base_classnames=base, only=["C"], progress=False)
    assert sorted(p.name for p in (tmp_path / "onlyC").iterdir()) == ["C_Syn", "manifest.json"]
    assert (tmp_path / "onlyC/C_Syn/image_text.csv").read_text() == (tmp_path / "all/C_Syn/image_text.csv").read_text()
    with pytest.raises(ValueError, match="unknown task.*'D'.*A, B, C"):
        synthesize_sequence(FakeGenerator(), tasks, tmp_path / "x", images_per_task=4, seed=3,
                            base_classnames=base, only=["D"])
    with pytest.raises(ValueError, match="twice"):
        synthesize_sequence(FakeGenerator(), [("A", ["a"]), ("A", ["b"])], tmp_path / "x", images_per_task=4, seed=3)


def test_task_files_json_and_csv(tmp_path):
    j = tmp_path / "tasks.json"
    j.write_text(json.dumps({"tasks": [{"name": "Birds", "classnames": ["robin", "wren"],
                                        "template": "a photo of a {}, a bird."},
                                       {"name": "Trees", "classnames": ["oak"]}],
                             "base_classnames": ["thing"]}))
    tasks, base = load_task_file(j)
    assert tasks == [("Birds", ["robin", "wren"], "a photo of a {}, a bird."), ("Trees", ["oak"], None)]
    assert base == ["thing"]
    c = tmp_path / "tasks.csv"
    c.write_text("task,classname\nBirds,robin\nTrees,oak\nBirds,\"wren, the small\"\n")
    tasks, base = load_task_file(c)
    assert tasks == [("Birds", ["robin", "wren, the small"], None), ("Trees", ["oak"], None)] and base is None
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\nA,b\n")
    with pytest.raises(ValueError, match="header 'task,classname'"):
        load_task_file(bad)
    bad.write_text('{"tasks": [{"name": "A"}]}')
    with pytest.raises(ValueError, match="classnames"):
        load_task_file(bad)
    with pytest.raises(FileNotFoundError):
        load_task_file(tmp_path / "nope.json")


def test_mtil_tasks_order_1_and_unknown_order():
    from gift_fast.synth.engine import mtil_tasks
    tasks = mtil_tasks(1)
    assert [t[0] for t in tasks][:3] == ["Aircraft", "Caltech101", "CIFAR100"] and len(tasks) == 11
    assert len(tasks[0][1]) == 100
    # each task carries its own first template: the one its entries in the prompt pool use
    assert tasks[0][2] == "a photo of a {}, a type of aircraft." and tasks[7][2] == 'a photo of the number: "{}".'
    with pytest.raises(ValueError, match="unknown order 3"):
        mtil_tasks(3)


# --------------------------------------------------------------------------- protocol options (the authors' prompts)
TASKS3 = [("A", ["a1", "a2"], "an {} of A."), ("B", ["b1"], "a {}, from B."), ("C", ["c1", "c2", "c3"])]


def _csv_rows(path):
    return list(csv.reader(open(path, newline="")))[1:]


def test_pool_entries_use_their_own_template_and_pool_exclude(tmp_path):
    synthesize_sequence(FakeGenerator(), TASKS3, tmp_path / "o", images_per_task=60, seed=1, base_classnames=["x"],
                        progress=False)
    c = {r[1] for r in _csv_rows(tmp_path / "o/C_Syn/image_text.csv")}
    assert c == {"a photo of a x.", "an a1 of A.", "an a2 of A.", "a b1, from B."}   # 60 draws from 4
    man = synthesize_sequence(FakeGenerator(), TASKS3, tmp_path / "e", images_per_task=60, seed=1,
                              base_classnames=["x"], pool_exclude=["A"], progress=False)
    c = {r[1] for r in _csv_rows(tmp_path / "e/C_Syn/image_text.csv")}
    assert c == {"a photo of a x.", "a b1, from B."}
    tm = json.loads((tmp_path / "e/C_Syn/manifest.json").read_text())
    assert tm["pool_exclude"] == ["A"] and tm["pool_tasks"] == ["B"] and tm["pool_size"] == 2
    assert man["pool"]["pool_exclude"] == ["A"] and man["tasks"]["C"]["pool_tasks"] == ["B"]
    with pytest.raises(ValueError, match="unknown data set.*Z"):
        synthesize_sequence(FakeGenerator(), TASKS3, tmp_path / "z", images_per_task=2, seed=1,
                            base_classnames=["x"], pool_exclude=["Z"], progress=False)
    with pytest.raises(ValueError, match="pool of task 0 .*empty"):
        synthesize_sequence(FakeGenerator(), TASKS3, tmp_path / "z", images_per_task=2, seed=1,
                            base_classnames=["x"], pool_exclude=["base"], progress=False)
    # one template for all entries: the old single-template rule, on request
    synthesize_sequence(FakeGenerator(), TASKS3, tmp_path / "t", images_per_task=60, seed=1, base_classnames=["x"],
                        template="{} only", only=["C"], progress=False)
    assert {r[1] for r in _csv_rows(tmp_path / "t/C_Syn/image_text.csv")} == {"x only", "a1 only", "a2 only",
                                                                              "b1 only"}


def test_prompts_only_needs_no_generator_and_a_later_run_fills_the_folder(tmp_path):
    out = tmp_path / "p"
    man = synthesize_sequence(None, TASKS3, out, images_per_task=12, seed=4, base_classnames=["x"],
                              prompts_only=True, progress=False)
    assert man["prompts_only"] and sorted(p.name for p in (out / "B_Syn").iterdir()) == ["image_text.csv",
                                                                                        "manifest.json"]
    tm = json.loads((out / "B_Syn/manifest.json").read_text())
    assert tm["prompts_only"] and not tm["complete"] and tm["images"] == 12 and tm["pool_tasks"] == ["A"]
    only_prompts = _csv_rows(out / "B_Syn/image_text.csv")
    # the same options with a generator: same prompts, now with images (no "another configuration" refusal)
    synthesize_sequence(FakeGenerator(), TASKS3, out, images_per_task=12, seed=4, base_classnames=["x"],
                        progress=False)
    assert _csv_rows(out / "B_Syn/image_text.csv") == only_prompts
    assert len(list((out / "B_Syn").glob("*.jpeg"))) == 12
    with pytest.raises(SynthError, match="holds generated images"):
        synthesize_sequence(None, TASKS3, out, images_per_task=12, seed=4, base_classnames=["x"], prompts_only=True)
    with pytest.raises(ValueError, match="generator is needed"):
        synthesize_sequence(None, TASKS3, tmp_path / "q", images_per_task=2, seed=4, base_classnames=["x"])


def test_prompts_from_the_authors_layout(tmp_path):
    # the authors' CSV: image column with the path txt2img.py saw, rows in any order
    src = tmp_path / "authors" / "B_Syn"
    src.mkdir(parents=True)
    tasks = [("A", ["3 - three", "a1"], 'a photo of the number: "{}".'), ("B", ["b1"]), ("C", ["c1"])]
    texts = ["a photo of a x.", 'a photo of the number: "a1".', 'a photo of the number: "3 - three".',
             "a photo of a x."]
    rows = [f'./data/synthetic/synthetic_data_a/B_Syn/{j}.jpeg,"{texts[j].replace(chr(34), chr(34) * 2)}"'
            for j in (2, 0, 3, 1)]
    (src / "image_text.csv").write_text("image,text\n" + "\n".join(rows) + "\n")
    gen = FakeGenerator()
    synthesize_sequence(gen, tasks, tmp_path / "out", images_per_task=None, seed=42, base_classnames=["x"],
                        only=["B"], prompts_from=tmp_path / "authors", seed_scheme="authors", progress=False)
    assert [r[1] for r in _csv_rows(tmp_path / "out/B_Syn/image_text.csv")] == texts
    # image j of the task after data set k=1 (A, task index 1): j + 100000 * 0 + 10**7 * 42
    assert sorted(gen.seeds_seen()) == [420_000_000 + j for j in range(4)]
    m = read_image_meta(tmp_path / "out/B_Syn/3.jpeg", decode=True)
    assert m["prompt"] == texts[3] and m["seed"] == 420_000_003
    tm = json.loads((tmp_path / "out/B_Syn/manifest.json").read_text())
    assert tm["seed_scheme"] == "authors" and "10**7" in tm["seed_rule"] and "prompts from" in tm["prompt_source"]
    # the first N rows; more than there are is an error; a missing task file is named
    synthesize_sequence(FakeGenerator(), tasks, tmp_path / "out2", images_per_task=2, seed=42,
                        base_classnames=["x"], only=["B"], prompts_from=tmp_path / "authors", progress=False)
    assert [r[1] for r in _csv_rows(tmp_path / "out2/B_Syn/image_text.csv")] == texts[:2]
    with pytest.raises(ValueError, match="has 4 prompts"):
        synthesize_sequence(FakeGenerator(), tasks, tmp_path / "out3", images_per_task=5, seed=42,
                            base_classnames=["x"], only=["B"], prompts_from=tmp_path / "authors")
    with pytest.raises(FileNotFoundError, match="C_Syn/image_text.csv"):
        synthesize_sequence(FakeGenerator(), tasks, tmp_path / "out3", images_per_task=None, seed=42,
                            base_classnames=["x"], only=["C"], prompts_from=tmp_path / "authors")
    with pytest.raises(SynthError, match="is the output folder"):
        synthesize_sequence(FakeGenerator(), tasks, tmp_path / "authors", images_per_task=None, seed=42,
                            base_classnames=["x"], only=["B"], prompts_from=tmp_path / "authors")
    # prompts that cannot come from this sequence's pool (another order) are refused
    with pytest.raises(SynthError, match="not in this sequence's pool for B.*another order"):
        synthesize_sequence(FakeGenerator(), tasks[::-1], tmp_path / "out5", images_per_task=None, seed=42,
                            base_classnames=["x"], only=["B"], prompts_from=tmp_path / "authors")
    (src / "image_text.csv").write_text("image,text\n0.jpeg,a\n2.jpeg,b\n")
    with pytest.raises(ValueError, match="numbered 0..n-1"):
        synthesize_sequence(FakeGenerator(), tasks, tmp_path / "out4", images_per_task=None, seed=42,
                            base_classnames=["x"], only=["B"], prompts_from=tmp_path / "authors")


def test_seed_scheme_authors_changes_the_fingerprint_and_keeps_hash_folders_valid(tmp_path):
    gen = FakeGenerator()
    _run(gen, tmp_path, n=3, task_index=0)
    first = read_image_meta(tmp_path / "Birds_Syn/0.jpeg", decode=True)
    assert first["seed"] == image_seed(7, 0, 0)   # the default scheme is unchanged
    with pytest.raises(SynthError, match="seed_scheme"):
        _run(FakeGenerator(), tmp_path, n=3, task_index=0, seed_scheme="authors")
    gen = FakeGenerator()
    _run(gen, tmp_path / "a", n=3, task_index=0, seed_scheme="authors")
    # task index 0 follows ImageNet (k = 0): j + 100000 * (0 - 1) + 10**7 * 7
    assert sorted(gen.seeds_seen()) == [70_000_000 - 100_000 + j for j in range(3)]
