"""The code-flow builder on synthetic git repositories built in the test.

The main repository's first-parent history (7 commits) is laid out so that the 40-80% start
range covers exactly the commits whose changes we want to see: a rename with an edit, a merge,
a binary + vendored + text change, and a non-UTF-8 + text change. With `max_span=1` every start
commit's end is its successor, so the expected triplets follow from the history alone.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from loopcoder_jax.data import codeflow
from loopcoder_jax.data.codeflow import (
    FILE_SEP,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    IM_END,
    REPO_NAME,
    CodeFlowConfig,
    CodeFlowError,
    Summary,
    build_documents,
    parse_transition,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

A_PY_0 = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
A_PY_1 = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nX = 1\n"
CORE_3 = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nX = 2\n"
CORE_5 = "def add(a, b):\n    return b + a\n\n\ndef sub(a, b):\n    return a - b\n\n\nX = 2\n"
UTIL = "import os\n\n\ndef here():\n    return os.getcwd()\n"
UTIL_6 = "import os\n\n\ndef here():\n    return os.path.abspath(os.getcwd())\n"
README_0 = "# demo\n\nA tiny project.\n"
README_6 = "# demo\n\nA tiny project.\nNow with notes.\n"
PNG_0 = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(40))
PNG_5 = PNG_0 + b"\x00\x01"
LATIN_0 = b"caf\xe9\n"
LATIN_6 = b"caf\xe9 cr\xe8me\n"
VENDOR_JS = "function f() { return 1; }\n"

_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(repo, *args, input=None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | _ENV
    out = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        cwd=repo,
        env=env,
        input=input,
        capture_output=True,
        check=True,
    )
    return out.stdout.decode().strip()


def write(repo, path, data):
    full = os.path.join(repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def commit(repo, msg) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    """7 first-parent commits c0..c6 (c4 is a merge); returns (path, [c0..c6])."""
    repo = str(tmp_path_factory.mktemp("repos") / "demo")
    os.makedirs(repo)
    git(repo, "init", "-q")
    write(repo, "README.md", README_0)
    write(repo, "src/a.py", A_PY_0)
    write(repo, "logo.png", PNG_0)
    write(repo, "latin.txt", LATIN_0)
    c = [commit(repo, "c0")]
    write(repo, "src/a.py", A_PY_1)
    c.append(commit(repo, "c1"))
    os.symlink("../../../etc/passwd", os.path.join(repo, "link"))
    c.append(commit(repo, "c2 symlink"))
    os.remove(os.path.join(repo, "src/a.py"))
    write(repo, "src/core.py", CORE_3)
    c.append(commit(repo, "c3 rename with edit"))
    git(repo, "checkout", "-q", "-b", "side", c[1])
    write(repo, "src/util.py", UTIL)
    commit(repo, "side: util")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", "c4 merge side", "side")
    c.append(git(repo, "rev-parse", "HEAD"))
    write(repo, "src/core.py", CORE_5)
    write(repo, "logo.png", PNG_5)
    write(repo, "vendor/lib.js", VENDOR_JS)
    c.append(commit(repo, "c5 edit + binary + vendored"))
    write(repo, "README.md", README_6)
    write(repo, "latin.txt", LATIN_6)
    write(repo, "src/util.py", UTIL_6)
    c.append(commit(repo, "c6 readme + latin + util"))
    return repo, c


def build(repos, names=None, **kw):
    summary = Summary()
    cfg = CodeFlowConfig(**kw)
    return list(build_documents(repos, cfg, summary, names=names)), summary


def test_transitions_are_exactly_the_expected_triplets(demo_repo, tmp_path):
    repo, c = demo_repo
    docs, summary = build([repo], max_span=1, kinds=("transition",))
    got = [
        (
            d["commits"],
            d["paths"],
            *parse_transition(d["text"])[1:2],
            parse_transition(d["text"])[3],
        )
        for d in docs
    ]
    # start range 40-80% of 7 commits = indices 2..5; the end is the next first-parent commit.
    assert got == [
        ([c[2], c[3]], ["src/core.py"], {"src/a.py": A_PY_1}, {"src/core.py": CORE_3}),
        ([c[3], c[4]], ["src/util.py"], {}, {"src/util.py": UTIL}),
        ([c[4], c[5]], ["src/core.py"], {"src/core.py": CORE_3}, {"src/core.py": CORE_5}),
        (
            [c[5], c[6]],
            ["README.md", "src/util.py"],
            {"README.md": README_0, "src/util.py": UTIL},
            {"README.md": README_6, "src/util.py": UTIL_6},
        ),
    ]
    assert all(d["kind"] == "transition" and d["repo"] == "demo" for d in docs)
    # The binary, vendored and non-UTF-8 changes were left out, and counted.
    assert summary.skipped["transition file: binary"] == 1
    assert summary.skipped["transition file: non-UTF-8 content"] == 1
    assert summary.docs["transition"] == 4

    # An exact patch (hand-written) for the plain edit, including git's header lines.
    _, _, patch, _ = parse_transition(docs[2]["text"])
    assert patch == (
        "diff --git a/src/core.py b/src/core.py\n"
        "--- a/src/core.py\n"
        "+++ b/src/core.py\n"
        "@@ -1,5 +1,5 @@\n"
        " def add(a, b):\n"
        "-    return a + b\n"
        "+    return b + a\n"
        " \n"
        " \n"
        " def sub(a, b):\n"
    )
    # The rename is a rename in P, and the added file is a new file.
    _, _, patch, _ = parse_transition(docs[0]["text"])
    assert "rename from src/a.py\nrename to src/core.py\n" in patch
    assert "new file mode 100644\n" in parse_transition(docs[1]["text"])[2]
    # Full layout of one document, spelled out (docs/codeflow.md).
    d = docs[1]["text"]
    assert d.startswith(f"{REPO_NAME}demo\n<|im_start|>old\n<|im_end|>\n<|im_start|>patch\n")
    assert d.endswith(f"<|im_end|>\n<|im_start|>new\n{FILE_SEP}src/util.py\n{UTIL}<|im_end|>")

    # P applied to R_old (with an independent tool) gives R_new, for every triplet.
    for i, doc in enumerate(docs):
        _, old, patch, new = parse_transition(doc["text"])
        work = tmp_path / f"apply{i}"
        work.mkdir()
        for path, content in old.items():
            write(str(work), path, content)
        subprocess.run(["git", "apply", "-"], cwd=work, input=patch.encode(), check=True)
        for path, content in new.items():
            assert (work / path).read_text() == content
        for path in set(old) - set(new):
            assert not (work / path).exists()


def test_start_commits_come_from_the_middle_of_history(demo_repo):
    repo, c = demo_repo
    docs, _ = build([repo], min_span=8, max_span=8, transitions_per_repo=100, kinds=("transition",))
    starts = [c.index(d["commits"][0]) for d in docs]
    assert starts == [2, 3, 4, 5]
    # End commits are searched forward: the furthest end within the caps (here: HEAD).
    assert all(d["commits"][1] == c[6] for d in docs)
    # A cap of one changed file (counted after the path filters, before the content filters):
    # start 2 stops at c3 (c4 adds util.py), start 3 at c4; c4 -> c5 changes core.py and
    # logo.png, and c5 -> c6 three files, so those two starts yield nothing.
    docs, summary = build(
        [repo], min_span=8, max_span=8, max_files_per_transition=1, kinds=("transition",)
    )
    assert [[c.index(x) for x in d["commits"]] for d in docs] == [[2, 3], [3, 4]]
    assert summary.skipped["transition: no eligible change within caps"] == 2


def test_fim_documents(demo_repo):
    repo, c = demo_repo
    docs, summary = build(
        [repo], kinds=("file_fim", "repo_fim"), repo_fim_per_repo=6, repo_context_files=1
    )
    head = {"README.md": README_6, "src/core.py": CORE_5, "src/util.py": UTIL_6}
    file_docs = [d for d in docs if d["kind"] == "file_fim"]
    # One file-level document per eligible file of HEAD; the others were skipped, with reasons.
    assert [d["paths"] for d in file_docs] == [["README.md"], ["src/core.py"], ["src/util.py"]]
    for why in ("binary", "non-UTF-8 content", "vendored path", "symlink"):
        assert summary.skipped[f"file: {why}"] == 1, why
    for d in file_docs:
        text = d["text"]
        assert text.startswith(FIM_PREFIX) and text.endswith(IM_END)
        pre, rest = text[len(FIM_PREFIX) : -len(IM_END)].split(FIM_SUFFIX)
        suf, mid = rest.split(FIM_MIDDLE)
        assert pre + mid + suf == head[d["paths"][0]]
        assert d["commits"] == [c[6]]
        if d["split"] == "line":  # whole lines: the middle starts and ends on a line boundary
            assert pre == "" or pre.endswith("\n")
            assert mid.endswith("\n") or suf == ""
    repo_docs = [d for d in docs if d["kind"] == "repo_fim"]
    assert len(repo_docs) == 6
    for d in repo_docs:
        *context, target = d["paths"]
        assert len(context) == 1 and context[0] != target
        text = d["text"]
        ctx = context[0]
        prefix = f"{REPO_NAME}demo\n{FILE_SEP}{ctx}\n{head[ctx]}{FILE_SEP}{target}\n{FIM_PREFIX}"
        assert text.startswith(prefix)
        pre, rest = text[len(prefix) : -len(IM_END)].split(FIM_SUFFIX)
        suf, mid = rest.split(FIM_MIDDLE)
        assert pre + mid + suf == head[target]
    # Both split kinds occur.
    assert {d["split"] for d in docs} == {"line", "span"}


def test_deterministic_with_a_seed(demo_repo):
    repo, _ = demo_repo
    a, _ = build([repo], seed=3, max_span=3)
    b, _ = build([repo], seed=3, max_span=3)
    other, _ = build([repo], seed=4, max_span=3)
    assert a == b
    assert [d["text"] for d in a] != [d["text"] for d in other]


def test_split_fim_line_mode_takes_whole_lines():
    cfg = CodeFlowConfig(line_fim_rate=1.0, max_fim_lines=2)
    text = "a\nbb\nccc\ndddd"
    for seed in range(20):
        pre, mid, suf, mode = codeflow.split_fim(text, random.Random(seed), cfg)
        assert mode == "line" and pre + mid + suf == text
        assert 1 <= len(mid.splitlines()) <= 2
        assert pre == "" or pre.endswith("\n")


def test_one_commit_repo_empty_repo_and_not_a_repo(tmp_path):
    one = str(tmp_path / "one")
    os.makedirs(one)
    git(one, "init", "-q")
    write(one, "main.py", "print('hi')\n")
    commit(one, "only")
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    git(empty, "init", "-q")
    docs, summary = build([one, empty], repo_fim_per_repo=1)
    assert [d["kind"] for d in docs] == ["file_fim", "repo_fim"]
    assert summary.skipped["repo: fewer than 2 commits (no transitions)"] == 1
    assert summary.skipped["repo: no commits"] == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CodeFlowError, match="not a git repository"):
        build([str(plain)])
    with pytest.raises(CodeFlowError, match="cannot resolve --ref"):
        build([one], ref="no-such-branch")


def test_paths_that_escape_the_repo_are_skipped(tmp_path):
    """Tree entries named '..', '.git', with a newline or not UTF-8 (git mktree allows them)."""
    repo = str(tmp_path / "evil")
    os.makedirs(repo)
    git(repo, "init", "-q")
    blob = git(repo, "hash-object", "-w", "--stdin", input=b"x = 1\n")

    def mktree(entries):
        data = b"".join(b"%s %s %s\t%s\0" % (m, t, s.encode(), n) for m, t, s, n in entries)
        return git(repo, "mktree", "-z", input=data)

    sub = mktree([(b"100644", b"blob", blob, b"passwd")])
    root = mktree(
        [
            (b"040000", b"tree", sub, b".."),
            (b"040000", b"tree", sub, b".git"),
            (b"100644", b"blob", blob, b"a\nb.py"),
            (b"100644", b"blob", blob, b"caf\xe9.py"),
            (b"100644", b"blob", blob, b"ok.py"),
        ]
    )
    head = git(repo, "commit-tree", "-m", "evil", root)
    git(repo, "update-ref", "refs/heads/main", head)
    docs, summary = build([repo], kinds=("file_fim",))
    assert [d["paths"] for d in docs] == [["ok.py"]]
    assert summary.skipped["file: unsafe path"] == 3
    assert summary.skipped["file: non-UTF-8 path"] == 1


def test_repository_config_cannot_run_commands(demo_repo, tmp_path):
    """Hooks, fsmonitor, textconv, external diff and pager set by the repository never run."""
    repo, _ = demo_repo
    clone = str(tmp_path / "hostile")
    subprocess.run(["git", "clone", "-q", repo, clone], check=True, capture_output=True)
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    for key, value in [
        ("core.fsmonitor", cmd),
        ("core.hooksPath", str(tmp_path / "hooks")),
        ("diff.external", cmd),
        ("diff.evil.textconv", cmd),
        ("core.pager", cmd),
        ("log.showSignature", "true"),
        ("gpg.program", cmd),
    ]:
        git(clone, "config", key, value)
    (tmp_path / "hooks").mkdir()
    for hook in ("post-checkout", "pre-commit", "post-index-change", "reference-transaction"):
        (tmp_path / "hooks" / hook).write_text(f"#!/bin/sh\n{cmd}\n")
        (tmp_path / "hooks" / hook).chmod(0o755)
    write(clone, ".git/info/attributes", "* diff=evil\n")
    docs, _ = build([clone], max_span=2)
    assert docs and not marker.exists()


def test_cli_writes_jsonl_and_summary(demo_repo, tmp_path):
    repo, _ = demo_repo
    out = tmp_path / "sub" / "flow.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "loopcoder_jax.data.codeflow", "--repo", repo, "--out", str(out)]
        + ["--name", "proj", "--max-span", "1", "--no-progress", "--seed", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected, _ = build([repo], names=["proj"], max_span=1, seed=0)
    assert records == expected
    assert {r["repo"] for r in records} == {"proj"}
    assert records[0]["text"].startswith(f"{REPO_NAME}proj\n")
    assert "skipped:" in proc.stderr and "binary" in proc.stderr
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]
    bad = subprocess.run(
        [sys.executable, "-m", "loopcoder_jax.data.codeflow", "--repo", str(tmp_path)]
        + ["--out", str(tmp_path / "x.jsonl")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a git repository" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_documents_tokenize_with_special_tokens_as_single_ids(demo_repo):
    """The shipped tokenizer reserves every marker of the layouts as one id."""
    from loopcoder_jax.data import load_tokenizer

    tok = load_tokenizer()
    repo, _ = demo_repo
    docs, _ = build([repo], max_span=1, repo_fim_per_repo=2)
    markers = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, IM_END, REPO_NAME, FILE_SEP, "<|im_start|>")
    for token in markers:
        assert tok.encode(token, add_bos=False) == [tok.special_ids[token]], token
    for d in docs:
        ids = tok.encode(d["text"], add_bos=False)
        for token in markers:
            assert ids.count(tok.special_ids[token]) == d["text"].count(token), token
        assert tok.decode(ids) == d["text"]
