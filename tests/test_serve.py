"""pipe serve: a real uvicorn process on a free loopback port, asked what a user would ask it."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline.data.images import encode_png
from tests.conftest import digits_images, start_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(digits_run):
    proc, base = start_server(digits_run, "--max-upload-mb", "1")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory) -> list[Path]:
    imgs, _ = digits_images("test", 3)
    out = tmp_path_factory.mktemp("serve_imgs")
    paths = []
    for i, img in enumerate(imgs):
        p = out / f"digit-{i}.png"
        p.write_bytes(encode_png(img))
        paths.append(p)
    return paths


def post(base: str, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return httpx.post(base + "/query", files=[("images", (name, data, "image/png")) for name, data in files], params=params, timeout=60)


def cli_json(run: Path, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "cli.main", "query", str(run), str(path), "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_health_and_info(server, digits_run):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/info").json()
    assert info == json.loads(json.dumps({**pipeline.load(digits_run).summary(), "learning": None}))


def test_one_image_answers_what_pipe_query_json_prints(server, digits_run, test_pngs):
    r = post(server, [(str(test_pngs[0]), test_pngs[0].read_bytes())])
    assert r.status_code == 200
    assert r.json() == {"results": [cli_json(digits_run, test_pngs[0])]}


def test_several_images_answer_in_order(server, digits_run, test_pngs):
    r = post(server, [(p.name, p.read_bytes()) for p in test_pngs], k=3, patches=2)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["image"] for x in results] == [p.name for p in test_pngs]
    run = pipeline.load(digits_run)
    labels, _ = run.predict(np.stack([np.asarray(Image.open(p))[..., None] for p in test_pngs]))
    assert [x["prediction"] for x in results] == [run.class_names[i] for i in labels]
    assert all(len(x["patches"]) == 2 and all(len(p["nearest"]) <= 3 for p in x["patches"]) for x in results)


def test_garbage_bytes_are_a_400_and_the_server_stays_up(server):
    r = post(server, [("notes.png", b"this is not an image at all")])
    assert r.status_code == 400 and "cannot read notes.png" in r.json()["error"] and r.json()["image"] == "notes.png"
    r = httpx.post(server + "/query", timeout=10)
    assert r.status_code == 400 and "multipart field 'images'" in r.json()["error"]
    assert httpx.get(server + "/health").status_code == 200


def test_an_oversized_upload_is_a_413_whether_or_not_it_says_its_length(server):
    big = np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()  # 2 MiB, limit 1 MiB
    r = post(server, [("big.png", big)])
    assert r.status_code == 413 and "limit of 1 MiB" in r.json()["error"]

    def chunks():  # a well-formed multipart body with no Content-Length: it is counted as it arrives
        yield b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]
        yield b"\r\n--b0undary--\r\n"

    r = httpx.post(server + "/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.get(server + "/health").status_code == 200


def test_another_size_is_fitted_with_a_note_and_resize_stretches(server, digits_run):
    """An image of another size is scaled to cover the run's 8x8 and centre-cropped (the answer is
    the one for those pixels, fitted here by hand) with a note; ``resize`` stretches instead."""
    from pipeline.data.images import resize_array

    img = np.asarray(Image.fromarray(digits_images("test", 1)[0][0][..., 0]).resize((16, 12)))
    data = encode_png(img[..., None])
    r = post(server, [("big.png", data)])
    assert r.status_code == 200 and r.json()["results"][0]["image"] == "big.png"
    assert r.json()["notes"] == ["big.png is 12x16 (height x width): fitted to the run's 8x8, scaled to cover it (proportions kept), then centre-cropped"]
    by_hand = resize_array(img[..., None], (8, 11))[:, 1:9]  # 12x16 scaled by 8/12 to 8x11, centre 8 columns
    run = pipeline.load(digits_run)
    want = run.predict(by_hand[None])[1][0]
    assert np.allclose([r.json()["results"][0]["probabilities"][c] for c in run.class_names], want, atol=1e-5)
    r = post(server, [("big.png", data)], resize="8x8")
    assert r.status_code == 200 and r.json()["results"][0]["image"] == "big.png" and "notes" not in r.json()
    assert post(server, [("big.png", data)], resize="eight").status_code == 400
    assert post(server, [("x.png", data)], k=0).status_code == 400


def test_pictures_are_the_runs_own_pixels(server, digits_run):
    run = pipeline.load(digits_run)
    pid = 17
    got = np.asarray(Image.open(io.BytesIO(httpx.get(server + f"/pattern/{pid}.png").content)))
    want = run.pattern_pixels([pid])[0][..., 0]
    scale = got.shape[0] // want.shape[0]
    assert scale >= 1 and np.array_equal(got[::scale, ::scale], want)
    assert httpx.get(server + f"/pattern/{run.vocab.size}.png").status_code == 404
    # a code pattern in a patch's brightness and contrast (rounded to a tenth, as the server caches them)
    code = int(np.flatnonzero(run.table.metadata["atom"] >= 0)[0])
    got = np.asarray(Image.open(io.BytesIO(httpx.get(server + f"/pattern/{code}.png", params={"brightness": 90.04, "contrast": 30.0}).content)))
    want = run.pattern_pixels([code], like=(90.0, 30.0))[0][..., 0]
    scale = got.shape[0] // want.shape[0]
    assert np.array_equal(got[::scale, ::scale], want) and not np.array_equal(want, run.pattern_pixels([code])[0][..., 0])
    for bad in ({"brightness": 10}, {"brightness": 10, "contrast": 300}, {"brightness": -1, "contrast": 3}):
        assert httpx.get(server + f"/pattern/{code}.png", params=bad).status_code == 400
    # a training image's thumbnail is that image of the source (digits are 8x8: stored as they are)
    row = 5
    image_id = int(run.training_images.metadata["image_id"][row])
    src = pipeline.open_source("digits", split="train")
    want = next(b for b in src.batches(64, 1) if image_id in b.ids)
    want = want.images[list(want.ids).index(image_id)][..., 0]
    got = np.asarray(Image.open(io.BytesIO(httpx.get(server + f"/training-image/{row}.png").content)))
    scale = got.shape[0] // 8
    assert np.array_equal(got[::scale, ::scale], want)
    assert run.training_images.metadata["name"][row] == f"digits:train:{image_id}"
    assert httpx.get(server + "/training-image/-1.png").status_code == 404


def test_class_patterns_are_ranked_by_their_push_over_the_class(server, digits_run):
    run = pipeline.load(digits_run)
    c = 3
    got = httpx.get(server + f"/class/{c}", params={"n": 10}).json()
    # reference: push of each pattern towards class c (above the classes' mean), times its count in class c
    w = run.model.head.weight.detach().numpy()
    push = run.table.vectors[: run.vocab.size] @ (w[c] - w.mean(0))
    score = push * run.table.metadata["class_counts"][:, c]
    best = sorted(range(len(score)), key=lambda i: -score[i])[:10]
    assert [p["pattern_id"] for p in got["patterns"]] == best and got["class"] == run.class_names[c]
    assert httpx.get(server + "/class/99").status_code == 404
    assert httpx.get(server + f"/class/{run.class_names[c]}", params={"n": 10}).json() == got  # by name, too
    r = httpx.get(server + "/class/cat")
    assert r.status_code == 404 and "class 'cat' does not exist; name one of 0, 1, 2" in r.json()["error"]


def test_a_port_in_use_is_one_line(digits_run):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(digits_run), "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr


def test_workers_are_processes_that_each_answer(digits_run):
    """--workers 2: two answering processes under the one that was started, both serving the port."""
    proc, base = start_server(digits_run, "--workers", "2")
    try:
        kids = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir() for c in (t / "children").read_text().split()]
        assert len(kids) >= 2  # the supervisor's worker processes
        data = encode_png(digits_images("test", 1)[0][0])
        assert all(post(base, [("d.png", data)]).status_code == 200 for _ in range(10))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(digits_run), "--workers", "-1"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == "Error: --workers -1 must be 0 (one per core) to 64"


def learn(base: str, data: bytes, label: str, **headers) -> httpx.Response:
    return httpx.post(base + "/learn", files={"image": ("wrong.png", data, "image/png")}, data={"label": label}, headers=headers, timeout=60)


def test_learning_is_off_unless_the_server_was_started_to_learn(server):
    data = encode_png(digits_images("test", 1)[0][0])
    for r in (learn(server, data, "3"), httpx.post(server + "/save")):
        assert r.status_code == 403 and "--learn-into" in r.json()["error"]


def test_a_learning_server_answers_a_taught_image_as_taught_and_saves_a_run(digits_run, tmp_path):
    run = pipeline.load(digits_run)
    images, labels = digits_images("test")
    pred, _ = run.predict(images)
    wrong = np.flatnonzero(pred != labels)
    truth = run.class_names[int(labels[wrong[0]])]
    data = encode_png(images[wrong[0]])
    out = tmp_path / "taught"
    proc, base = start_server(digits_run, "--learn-into", str(out))
    try:
        assert httpx.get(base + "/info").json()["learning"] == {"into": str(out.resolve()), "lessons": 0, "unsaved": 0}
        assert learn(base, data, "3", Origin="http://elsewhere.example").status_code == 403  # another site's page cannot teach it
        assert learn(base, data, "").status_code == 400
        assert httpx.post(base + "/learn", files={"image": ("a.png", data, "image/png")}).status_code == 400  # no label
        r = learn(base, data, truth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["learned"]["before"]["prediction"] != truth and body["learned"]["after"]["prediction"] == truth
        assert body["result"]["prediction"] == truth and body["lessons"] == 1 and body["unsaved"] == 1
        assert post(base, [("again.png", data)]).json()["results"][0]["prediction"] == truth  # asked again: the new answer
        saved = httpx.post(base + "/save", timeout=120).json()
        assert saved == {"saved": str(out.resolve()), "into": str(out.resolve()), "lessons": 1, "unsaved": 0}
        assert pipeline.load(out).predict(images[wrong[0]][None])[0][0] == labels[wrong[0]]
        assert learn(base, encode_png(images[wrong[1]]), "ten").json()["learned"]["new_class"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    taught = pipeline.load(out)  # the lesson after the save was written at shutdown
    assert [t["class"] for t in taught.manifest["taught"]["images"]] == [truth, "ten"] and taught.class_names[-1] == "ten"


@pytest.mark.parametrize("extra, says", [
    (["--workers", "2"], "--learn-into needs one worker process"),
    (["--learn-into", "RUN"], "is (or holds, or is inside) the served run"),
])
def test_learning_options_that_cannot_work_are_one_line(digits_run, extra, says):
    args = [str(digits_run) if a == "RUN" else a for a in extra]
    if "--learn-into" not in args:
        args += ["--learn-into", str(digits_run.parent / "elsewhere")]
    r = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(digits_run), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and says in r.stderr.strip().splitlines()[-1]
