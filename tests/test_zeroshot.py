"""Zero-shot accuracy through lm-evaluation-harness (measure.zeroshot) on tiny random models."""

import hashlib
import json
import random

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.errors import AssetError, ConfigError, TaskError
from rankcut.measure import zeroshot

from .conftest import VOCAB, tiny_model, tiny_tokenizer, word_text

QUESTIONS_WORDS = """\
: capital-common-countries
Athens Greece Baghdad Iraq
Athens Greece Bangkok Thailand
Baghdad Iraq Beijing China
Berlin Germany Bern Switzerland
Cairo Egypt Canberra Australia
Hanoi Vietnam Havana Cuba
: gram8-plural
banana bananas bird birds
bottle bottles building buildings
car cars cat cats
child children cloud clouds
color colors computer computers
cow cows dog dogs
"""


@pytest.fixture(autouse=True)
def isolated_caches(request, tmp_path, monkeypatch):
    """Task YAMLs and the ``datasets`` cache go to tmp_path (the real-model test keeps the real
    rankcut cache, where SmolLM2 and the analogy file live)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer()


def write_jsonl(path, questions):
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def random_questions(n, seed=0, num_choices=4):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(VOCAB - 1)]
    return [{"query": " ".join(rng.choices(words, k=6)), "choices": rng.sample(words, num_choices),
             "gold": rng.randrange(num_choices)} for _ in range(n)]


# --- the analogy builder ---------------------------------------------------------------------

def test_analogies_are_deterministic_well_formed_and_seeded():
    sections = zeroshot.parse_questions_words(QUESTIONS_WORDS)
    assert list(sections) == ["capital-common-countries", "gram8-plural"]
    assert sections["gram8-plural"][2] == ("car", "cars", "cat", "cats")
    questions = zeroshot.analogy_questions(sections, per_section=4, seed=0)
    assert questions == zeroshot.analogy_questions(sections, per_section=4, seed=0)
    assert [q["section"] for q in questions].count("gram8-plural") == 4
    assert len(questions) == 8
    rows = {f"{a} is to {b} as {c} is to": (section, a, b, c, d)
            for section, lines in sections.items() for a, b, c, d in lines}
    for q in questions:
        section, a, b, c, d = rows[q["query"]]
        assert q["section"] == section
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert q["choices"][q["gold"]] == d
        d_words = {line[3] for line in sections[section]}
        for distractor in q["choices"][:q["gold"]] + q["choices"][q["gold"] + 1:]:
            assert distractor in d_words and distractor not in (a, b, c, d)
    assert {q["gold"] for q in questions} != {0}  # gold is shuffled, not always first
    assert zeroshot.analogy_questions(sections, per_section=4, seed=1) != questions
    one_section = {"gram8-plural": sections["gram8-plural"]}
    alone = zeroshot.analogy_questions(one_section, per_section=4, seed=0)
    assert sorted(map(json.dumps, alone)) == sorted(
        json.dumps(q) for q in questions if q["section"] == "gram8-plural")


def test_questions_words_parse_errors():
    with pytest.raises(AssetError, match="line 1"):
        zeroshot.parse_questions_words("a b c d\n")
    with pytest.raises(AssetError, match="line 3"):
        zeroshot.parse_questions_words(": s\na b c d\na b c\n")


# --- local JSONL tasks -----------------------------------------------------------------------

def test_local_task_yaml_is_written_once_atomically(tmp_path):
    import yaml

    data = write_jsonl(tmp_path / "my data.v2.jsonl", random_questions(3))
    names, external = zeroshot.resolve_tasks([f"local:{data}", str(data)])
    assert names == ["local_my_data_v2"] and external == []
    folder = zeroshot.tasks_dir()
    assert str(folder).startswith(str(tmp_path / "cache"))
    assert [p.name for p in folder.iterdir()] == ["local_my_data_v2.yaml"]  # no temp files
    config = yaml.safe_load((folder / "local_my_data_v2.yaml").read_text())
    assert config["task"] == "local_my_data_v2"
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    stamp = (folder / "local_my_data_v2.yaml").stat().st_mtime_ns
    zeroshot.write_local_task(data)
    assert (folder / "local_my_data_v2.yaml").stat().st_mtime_ns == stamp


BAD_LINES = [
    ('{"query": "w1", "choices": ["w2", "w3"], "gold": 2}', r"line 2: \"gold\" is 2, outside"),
    ('{"query": "w1", "choices": ["w2", "w3"], "gold": -1}', "outside 0..1"),
    ('{"query": "w1", "choices": ["w2", "w3"], "gold": true}', "must be an integer"),
    ('{"query": "w1", "choices": ["w2", "w3"], "gold": "1"}', "must be an integer"),
    ('{"query": "w1", "choices": "w2 w3", "gold": 0}', "list of at least 2"),
    ('{"query": "w1", "choices": ["w2"], "gold": 0}', "list of at least 2"),
    ('{"query": 3, "choices": ["w2", "w3"], "gold": 0}', "query"),
    ('{"query": "w1", "gold": 0}', "missing key.*choices"),
    ('{"query": "w1", "choices": ["w2", ', r"line 2: not valid JSON"),
    ('["w1", "w2"]', "expected a JSON object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_malformed_local_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "w1", "choices": ["w2", "w3"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskError, match=message):
        zeroshot.resolve_tasks([f"local:{path}"])


def test_missing_empty_and_clashing_local_files(tmp_path):
    with pytest.raises(TaskError, match="local task file not found"):
        zeroshot.resolve_tasks([f"local:{tmp_path / 'nope.jsonl'}"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskError, match="holds no questions"):
        zeroshot.resolve_tasks([f"local:{tmp_path / 'empty.jsonl'}"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "q.jsonl", random_questions(2))
    second = write_jsonl(tmp_path / "b" / "q.jsonl", random_questions(2))
    with pytest.raises(TaskError, match="both become task local_q"):
        zeroshot.resolve_tasks([f"local:{first}", f"local:{second}"])


def test_bad_settings(tiny, tmp_path):
    data = f"local:{write_jsonl(tmp_path / 'q.jsonl', random_questions(2))}"
    for kwargs in ({"limit": 0}, {"num_fewshot": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            zeroshot.evaluate_tasks(*tiny, [data], **kwargs)
    with pytest.raises(ConfigError, match="no task"):
        zeroshot.evaluate_tasks(*tiny, [])


# --- running lm-eval -------------------------------------------------------------------------

def test_local_task_end_to_end(tiny, tmp_path):
    data = write_jsonl(tmp_path / "rand.jsonl", random_questions(12))
    results = zeroshot.evaluate_tasks(*tiny, [f"local:{data}"], batch_size=4)
    row = results["local_rand"]
    assert row["samples"] == 12
    assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert row["acc_stderr"] > 0 and row["acc_norm_stderr"] >= 0
    limited = zeroshot.evaluate_tasks(*tiny, [f"local:{data}"], limit=5, num_fewshot=2)
    assert limited["local_rand"]["samples"] == 5


def _next_word_logprobs(model, tokenizer, query: str) -> dict[str, float]:
    """log p(word | query) of every 3-character word w10..w94, from one forward pass."""
    ids = tokenizer(query, return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].double(), dim=-1)
    words = [f"w{i}" for i in range(10, VOCAB - 1)]
    return {w: logprobs[tokenizer.convert_tokens_to_ids(w)].item() for w in words}


def test_scoring_follows_the_models_own_likelihoods(tiny, tmp_path):
    """Gold = the model's most likely next word among the choices must score 1.0; gold = the
    least likely must score 0.0 (choices of equal length, so acc_norm agrees)."""
    model, tokenizer = tiny
    rng = random.Random(5)
    best, worst = [], []
    while len(best) < 16:
        query = word_text(8, seed=rng.randrange(10**6))
        ranked = sorted(_next_word_logprobs(model, tokenizer, query).items(),
                        key=lambda kv: kv[1], reverse=True)
        top, bottom = ranked[0][0], ranked[-1][0]
        if ranked[0][1] - ranked[1][1] < 1e-4 or ranked[-2][1] - ranked[-1][1] < 1e-4:
            continue  # a near tie could flip with batching's rounding
        middle = [w for w, _ in rng.sample(ranked[1:-1], 2)]
        choices = [top, bottom, *middle]
        rng.shuffle(choices)
        best.append({"query": query, "choices": choices, "gold": choices.index(top)})
        worst.append({"query": query, "choices": choices, "gold": choices.index(bottom)})
    assert len({q["gold"] for q in best}) > 1
    results = zeroshot.evaluate_tasks(
        model, tokenizer, [f"local:{write_jsonl(tmp_path / 'best.jsonl', best)}",
                           f"local:{write_jsonl(tmp_path / 'worst.jsonl', worst)}"])
    assert results["local_best"]["acc"] == 1.0 and results["local_best"]["acc_norm"] == 1.0
    assert results["local_worst"]["acc"] == 0.0 and results["local_worst"]["acc_norm"] == 0.0
    assert results["local_best"]["samples"] == results["local_worst"]["samples"] == 16


def test_compressed_checkpoint_evaluates_and_rng_is_kept(tmp_path):
    model = tiny_model("llama")
    rankcut.compress(model, rankcut.make_config("svd", ratio=0.3), None)
    saved = rankcut.save_pretrained(model, tmp_path / "ck", tiny_tokenizer())
    loaded, tokenizer = rankcut.load_model(saved)
    data = write_jsonl(tmp_path / "rand.jsonl", random_questions(6))
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    results = zeroshot.evaluate_tasks(loaded, tokenizer, [f"local:{data}"], seed=7)
    assert (random.random(), torch.rand(1)) == expected
    assert results["local_rand"]["samples"] == 6


def test_unknown_task_and_unreachable_hub(tiny, monkeypatch):
    with pytest.raises(TaskError, match="unknown task 'arc_eazy'.*Did you mean arc_easy"):
        zeroshot.evaluate_tasks(*tiny, ["arc_eazy"])

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError, match="arc_easy loads its dataset from the Hugging Face hub"
                                        ".*rankcut_analogies.*local:FILE.jsonl"):
        zeroshot.evaluate_tasks(*tiny, ["arc_easy"])


# --- command line ----------------------------------------------------------------------------

def test_cli_eval_tasks_prints_and_writes_json(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rand.jsonl", random_questions(8))
    out = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--tasks", f"local:{data}", "--limit", "6",
                 "--task-batch-size", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "local_rand" in printed and "acc_norm" in printed and "±" in printed
    figures = json.loads(out.read_text())
    assert "perplexity" not in figures  # only asked for tasks
    assert figures["tasks"]["local_rand"]["samples"] == 6
    assert 0 <= figures["tasks"]["local_rand"]["acc"] <= 1
    assert figures["task_settings"] == {"limit": 6, "num_fewshot": 0, "batch_size": 4,
                                        "seed": 0}

    text = tmp_path / "text.txt"
    text.write_text(word_text(400))
    assert main(["eval", str(model_dir), "--tasks", f"local:{data}", "--eval-file", str(text),
                 "--seqlen", "64", "--max-windows", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["perplexity"] > 1 and figures["windows"] == 2
    assert figures["tasks"]["local_rand"]["samples"] == 8


@pytest.mark.parametrize(("content", "message"), [
    (None, "local task file not found"),
    ('{"query": "w1", "choices": ["w2", "w3"], "gold": 5}\n', "outside 0..1"),
    ('{"query": "w1", "choices": ["w2", "w3"] "gold": 0}\n', "line 1: not valid JSON"),
])
def test_cli_bad_local_files_are_clear_errors(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "q.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["eval", str(model_dir), "--tasks", f"local:{path}"]) == 2
    err = capsys.readouterr().err
    assert f"rankcut: error: {path}" in err or "rankcut: error: local task file" in err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--limit", "3"], "--limit only apply with --tasks"),
    (["--tasks", "local:x.jsonl", "--limit", "0"], "limit must be at least 1"),
    (["--tasks", "local:x.jsonl", "--num-fewshot", "-1"], "num_fewshot must not be negative"),
])
def test_cli_bad_settings(model_dir, capsys, extra, message):
    assert main(["eval", str(model_dir), *extra]) == 2
    assert message in capsys.readouterr().err


# --- the real model (slow) -------------------------------------------------------------------

ANALOGIES_SHA256 = "7d05f8b4cd0bcab5fdc6e7a2ee8434798f7671a54fa224f151ff8298292df3d2"


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads waiting on each other made
    this test 7x slower (7 s vs 50 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_beats_chance_on_analogies(tmp_path, one_thread):
    path = zeroshot.ensure_analogies()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ANALOGIES_SHA256  # 700 questions
    out = tmp_path / "eval.json"
    assert main(["eval", "smollm2", "--tasks", "rankcut_analogies", "--limit", "100",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["tasks"]["rankcut_analogies"]
    assert row["samples"] == 100
    assert row["acc"] - 3 * row["acc_stderr"] > 0.25  # chance is 1/4
