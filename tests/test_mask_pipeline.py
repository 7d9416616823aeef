"""tools/generate_masks.py's pipeline: the same bytes as the package's generator run image by image
(SAM and SAM 2, tiny random-weight models, real-size images), kills of the main process and of a
worker lose nothing, a corrupt image is counted, named and skipped, --estimate writes nothing,
--max_side masks train, shares of the file list over torchrun ranks and SLURM array tasks."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import REPO
from inputs.images import load_rgb
from perf.mask_generation import synthetic_photo
from sam.files import decode_segmentation, load_annotations
from sam.geometry import mask_fit
from tools import check_dataset, generate_masks, mask_pipeline

LOWERED = {"pred_iou_thresh": -100.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}  # random weights find masks


def photo_tree(root, sizes=((500, 375), (375, 500))):
    """Real-size photographs (ImageNet's typical sizes) as JPEGs under root/train/c/."""
    os.makedirs(root / "train" / "c", exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        synthetic_photo(i, w, h).save(root / "train" / "c" / f"p{i}.JPEG", quality=90)
    return root


def tiny_sam():
    """SAM's own modules at a tiny size (no weights downloaded): 256-pixel encoder input, one block."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.manual_seed(0)
    dim, size = 32, 256
    encoder = ImageEncoderViT(depth=1, embed_dim=dim, img_size=size, mlp_ratio=2, num_heads=1, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=[0], window_size=0, out_chans=dim,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16), input_image_size=(size, size),
                           mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=1))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def tiny_sam2():
    """SAM 2.1 hiera_tiny's config with a tiny trunk (random weights; the predictor needs 1024 px)."""
    import torch
    from sam2.build_sam import build_sam2
    torch.manual_seed(0)
    trunk = "++model.image_encoder.trunk"
    return build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", hydra_overrides_extra=[
        f"{trunk}.embed_dim=16", f"{trunk}.num_heads=1", f"{trunk}.stages=[1,1,2,1]", f"{trunk}.global_att_blocks=[3]",
        f"{trunk}.window_spec=[8,4,4,4]", "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]"]).eval()


def package_generator(backend, net, points_per_batch):
    if backend == "sam":
        from segment_anything import SamAutomaticMaskGenerator as Generator
    else:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Generator
    return Generator(net, points_per_side=4, points_per_batch=points_per_batch, output_mode="coco_rle", **LOWERED)


def written(root, rel):
    return load_annotations(str(root / "masks" / "c" / (os.path.splitext(rel)[0] + ".json")))


RECORD_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")


def assert_same_records(mine, reference, iou_ulps=0):
    assert len(mine) == len(reference) > 3
    for a, r in zip(mine, reference):
        assert json.dumps(a["segmentation"]) == json.dumps(r["segmentation"])  # byte for byte
        for key in RECORD_KEYS:
            if key == "predicted_iou" and iou_ulps:
                assert abs(a[key] - r[key]) <= iou_ulps * np.spacing(np.float32(r[key])), (a[key], r[key])
            else:
                assert a[key] == r[key], key


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_pipeline_writes_the_package_generators_bytes(tmp_path, backend):
    """The package's generator as shipped (64 point prompts at a time; 4 here, of 16), run image by
    image, against the pipeline (decode and write processes, the model in the main process)."""
    pytest.importorskip("segment_anything" if backend == "sam" else "sam2")
    root = photo_tree(tmp_path / "data")
    net = tiny_sam() if backend == "sam" else tiny_sam2()
    rels = ["p0.JPEG", "p1.JPEG"]
    reference_generator = package_generator(backend, net, 4)
    reference = {rel: reference_generator.generate(np.asarray(load_rgb(str(root / "train" / "c" / rel))))
                 for rel in rels}
    # SAM: all 16 prompts in one batch through the pipeline gives the same bytes; SAM 2 on this CPU
    # gives the same masks in the same order, but its IoU head sums in another order for another
    # batch size, so a predicted_iou may differ in the last bit of its float32
    batched = package_generator(backend, net, 16)
    if backend == "sam2":
        for rel in rels:
            assert_same_records(batched.generate(np.asarray(load_rgb(str(root / "train" / "c" / rel)))),
                                reference[rel], iou_ulps=2)
        batched = package_generator(backend, net, 4)
    factory = partial(generate_masks.SamBackend, "", "tiny", "cpu", batched, backend)
    summary = generate_masks.generate(str(root), factory, workers=2, log_every=0)
    assert summary["mode"] == "pipeline" and summary["generated"] == 2 and not summary["failed"]
    for rel in rels:
        assert_same_records(written(root, rel), reference[rel])


def test_the_write_stage_compresses_as_the_package_does():
    pytest.importorskip("segment_anything")
    import torch
    from segment_anything.utils.amg import coco_encode_rle, mask_to_rle_pytorch
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((5, 375, 500)) > rng.random((5, 1, 1)))
    for rle in mask_to_rle_pytorch(masks):
        assert json.dumps(mask_pipeline.compress_segmentation(rle)) == json.dumps(coco_encode_rle(rle))


def test_points_per_batch_is_a_memory_setting_not_a_result():
    assert generate_masks.default_points_per_batch("cuda:3", 32) == 1024
    assert generate_masks.default_points_per_batch("cpu", 32) == 64
    entry = generate_masks.sam_settings("sam", "sam_vit_h_4b8939.pth", "vit_h", points_per_batch=1024)
    assert "points_per_batch" not in entry and entry["points_per_side"] == 32
    # a file made before, which recorded points_per_batch 64, is this run's file
    assert mask_pipeline.comparable({**entry, "points_per_batch": 64}) == mask_pipeline.comparable(entry)


def test_compile_wraps_the_image_encoder_and_is_recorded(tmp_path):
    pytest.importorskip("segment_anything")
    import torch
    net = generate_masks.compiled(tiny_sam(), True)
    assert isinstance(net.image_encoder, torch._dynamo.eval_frame.OptimizedModule)
    plain = generate_masks.sam_settings("sam", "", "vit_b")
    assert generate_masks.sam_settings("sam", "", "vit_b", compile=True) == {**plain, "compile": True}
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"annotations": [{"area": 1}], "generator": plain}))
    assert mask_pipeline.mask_file_state(str(path), {**plain, "compile": True}) == "other"


# ------------------------------------------------------------------------------------------------
# kills, corrupt images, the estimate

RUNNER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from tools import generate_masks

class StandIn:
    runs_in_main = {in_main}
    settings = {{"backend": "stand-in"}}

    def __call__(self, img):
        time.sleep({sleep})
        mask = np.zeros(img.shape[:2], np.uint8)
        mask[:, : img.shape[1] // 2] = 1
        return [{{"segmentation": mask, "area": int(mask.sum())}}]

summary = generate_masks.generate(sys.argv[1], StandIn, workers=2, log_every=0, settings=StandIn.settings)
json.dump(summary, open(sys.argv[2], "w"))
sys.exit(1 if summary["failed"] else 0)
"""


def small_tree(root, n=12):
    os.makedirs(root / "train" / "c", exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)).save(root / "train" / "c" / f"x{i:02d}.png")
    return root


def start_runner(root, in_main=True, sleep=0.25):
    script = RUNNER.format(repo=REPO, in_main=in_main, sleep=sleep)
    return subprocess.Popen([sys.executable, "-c", script, str(root), str(root / "summary.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def mask_files(root):
    return sorted(glob.glob(str(root / "masks" / "c" / "*.json")))


@pytest.mark.slow  # two fresh interpreters each (about 20 s on a busy 2-core machine)
@pytest.mark.parametrize("target, sig, in_main", [
    ("main", signal.SIGKILL, True), ("main", signal.SIGTERM, True),
    ("worker", signal.SIGKILL, True), ("worker", signal.SIGTERM, True), ("worker", signal.SIGKILL, False)])
def test_a_kill_loses_nothing_and_the_rerun_makes_exactly_the_missing_files(tmp_path, target, sig, in_main):
    root = small_tree(tmp_path / "data")
    proc = start_runner(root, in_main)
    deadline = time.time() + 60
    while len(mask_files(root)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    children = psutil.Process(proc.pid).children()
    assert len(children) == 2  # a decode and a write process / the CPU pool
    os.kill(proc.pid if target == "main" else children[-1].pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if target == "main" and sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and "run the same command to make the rest" in err
    if target == "worker":
        assert "a worker process ended" in err
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # no orphan
    before = {p: os.stat(p) for p in mask_files(root)}
    assert 3 <= len(before) < 12
    assert all(mask_pipeline.mask_file_state(p) == "ok" for p in before)  # every file is whole
    rerun = start_runner(root, in_main, sleep=0)
    rerun.communicate(timeout=120)
    summary = json.load(open(root / "summary.json"))
    assert rerun.returncode == 0, summary
    assert summary["generated"] == 12 - len(before) and summary["skipped_existing"] == len(before)
    assert len(mask_files(root)) == 12
    for p, st in before.items():  # the files made before the kill were not made again
        assert (os.stat(p).st_ino, os.stat(p).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not [n for n in os.listdir(root / "masks" / "c") if n.startswith(".")]  # no claim or temp file left


class SleepyStandIn:
    runs_in_main = True

    def __call__(self, img):
        time.sleep(0.2)
        return [{"segmentation": np.ones(img.shape[:2], np.uint8), "area": int(img.shape[0] * img.shape[1])}]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_worker_stops_the_run_and_the_rerun_makes_exactly_the_rest(tmp_path, sig):
    """The in-process version of the kill test above (a worker only): quick enough for every run."""
    import threading
    root = small_tree(tmp_path / "data")

    def kill_a_worker():
        while len(mask_files(root)) < 3:
            time.sleep(0.01)
        os.kill(psutil.Process().children()[-1].pid, sig)

    threading.Thread(target=kill_a_worker, daemon=True).start()
    first = generate_masks.generate(str(root), SleepyStandIn, workers=2, log_every=0, settings={"backend": "x"})
    assert first["failed"] and all("a worker process ended" in f for f in first["failed"])
    before = {p: os.stat(p).st_mtime_ns for p in mask_files(root)}
    assert len(before) == first["generated"] < 12 and all(mask_pipeline.mask_file_state(p) == "ok" for p in before)
    again = generate_masks.generate(str(root), SleepyStandIn, workers=2, log_every=0, settings={"backend": "x"})
    assert again["generated"] == 12 - len(before) and not again["failed"] and len(mask_files(root)) == 12
    assert all(os.stat(p).st_mtime_ns == t for p, t in before.items())
    assert not [n for n in os.listdir(root / "masks" / "c") if n.startswith(".")]


class QuickStandIn:
    runs_in_main = True
    settings = {"backend": "stand-in"}

    def __call__(self, img):
        return [{"segmentation": np.ones(img.shape[:2], np.uint8), "area": int(img.shape[0] * img.shape[1])}]


def quick_cpu_backend():
    return generate_masks.superpixel_segments


@pytest.mark.parametrize("factory, workers, mode", [(QuickStandIn, 2, "pipeline"), (quick_cpu_backend, 2, "pool"),
                                                    (QuickStandIn, 0, "serial")])
def test_a_corrupt_image_is_counted_named_and_skipped(tmp_path, factory, workers, mode):
    root = small_tree(tmp_path / "data", 4)
    (root / "train" / "c" / "x01.png").write_bytes(b"half a download")
    summary = generate_masks.generate(str(root), factory, workers=workers, log_every=0, settings={"backend": "x"})
    assert summary["mode"] == mode and summary["generated"] == 3
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith("c/x01.png: ")
    assert len(mask_files(root)) == 3


def test_estimate_writes_nothing_and_projects_the_cost(tmp_path, capsys):
    root = small_tree(tmp_path / "data", 6)
    result = generate_masks.main(["--data_path", str(root), "--backend", "superpixels", "--estimate", "2",
                                  "--workers", "2", "--estimate_gpus", "4"])
    assert not os.path.exists(root / "masks") or not mask_files(root)
    out = capsys.readouterr().out
    for line in ("decode ", "model ", "encode+write ", "wall-clock ", "all 6 images of train/", "on 4 GPUs"):
        assert line in out, line
    assert result["estimate_images"] == 2 and result["warmup"] == 1 and result["s_per_image"]["model"] > 0
    assert result["hours_on_gpus"] == pytest.approx(result["hours"] / 4)
    # the pipeline's estimate too, with the model in this process
    result = generate_masks.generate(str(root), QuickStandIn, workers=2, estimate=3, settings={"backend": "x"})
    assert result["mode"] == "pipeline" and result["estimate_images"] == 3 and not mask_files(root)


# ------------------------------------------------------------------------------------------------
# --max_side, shares, progress

def test_max_side_masks_are_recorded_and_fit_their_image(tmp_path):
    root = small_tree(tmp_path / "data", 2)
    Image.fromarray(np.asarray(synthetic_photo(3, 150, 101))).save(root / "train" / "c" / "big.png")
    summary = generate_masks.main(["--data_path", str(root), "--backend", "superpixels", "--max_side", "50",
                                   "--workers", "0"])
    assert summary["generated"] == 3 and not summary["failed"]
    data = json.load(open(root / "masks" / "c" / "big.json"))
    assert data["generator"]["max_side"] == 50
    assert (data["image"]["width"], data["image"]["height"]) == (150, 101)  # the image's own size
    assert data["annotations"][0]["segmentation"]["size"] == [34, 50]
    assert mask_fit((34, 50), (150, 101)) == "resize"  # training scales it to the image
    assert not check_dataset.check(str(root))["problems"]
    # full-size files are another setting: made again
    again = generate_masks.main(["--data_path", str(root), "--backend", "superpixels", "--workers", "0"])
    assert again["generated"] == 3
    assert decode_segmentation(load_annotations(str(root / "masks" / "c" / "big.json"))[0]["segmentation"]).shape \
        == (101, 150)


def test_a_downscaled_copy_keeps_the_aspect_ratio_training_accepts():
    rng = np.random.default_rng(0)
    for w, h, side in zip(rng.integers(2, 5000, 2000), rng.integers(2, 5000, 2000), rng.integers(1, 3000, 2000)):
        mw, mh = mask_pipeline.downscaled_size(int(w), int(h), int(side))
        assert max(mw, mh) <= max(side, 1) or (mw, mh) == (w, h)
        assert mask_fit((mh, mw), (int(w), int(h))) in ("same", "resize"), (w, h, side)


def test_shares_over_array_tasks_and_ranks_cover_every_image_once(monkeypatch):
    shares = []
    for task in range(3):
        for rank in range(2):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(10 + task))
            monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
            monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            shares.append(generate_masks.shard_of_this_process())
    assert sorted(shares) == [(r, 6) for r in range(6)]
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert generate_masks.shard_of_this_process(1, 4) == (2 + 1, 8)
    with pytest.raises(SystemExit, match="--shard 4 is not in 0..3"):
        generate_masks.shard_of_this_process(4, 4)


def test_progress_counts_every_ranks_work(tmp_path, capsys):
    ranks = [mask_pipeline.Progress(str(tmp_path), "train", r, 2, total=100, share=50, done_before=10, log_every=0)
             for r in range(2)]
    ranks[1].update(5, 40, 5, 1.0)
    ranks[0].update(20, 40, 20, 1.0)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "all ranks (2/2 reporting): 45/100 done" in line and "images/s, ETA" in line
    assert os.path.isdir(tmp_path / ".progress")  # hidden: mask listings skip it


def test_a_slurm_array_splits_the_file_list_between_its_tasks(tmp_path, capsys):
    import submitit_masks
    submitit_masks.main(["--dry_run", "--array", "4", "--array_parallelism", "2", "--ngpus", "8",
                         "--job_dir", str(tmp_path / "jobs"), "--data_path", str(tmp_path), "--backend", "sam"])
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%2" in out and "#SBATCH --ntasks-per-node=8" in out
    with pytest.raises(SystemExit):
        submitit_masks.parse_args(["--data_path", "x", "--shard", "1"])
    # each array task (submitit's debug executor runs them here) makes its share; together, all
    root = small_tree(tmp_path / "data", 6)
    jobs = submitit_masks.main(["--cluster", "debug", "--array", "2", "--job_dir", str(tmp_path / "jobs"),
                                "--data_path", str(root), "--backend", "superpixels", "--workers", "0"])
    summaries = [job.result() for job in jobs]
    assert [s["generated"] for s in summaries] == [3, 3] and len(mask_files(root)) == 6


def test_out_of_memory_halves_the_prompts_per_batch_and_keeps_the_masks(capsys):
    import torch

    class Generator:
        points_per_batch = 64
        output_mode = "coco_rle"

        def generate(self, img):
            if self.points_per_batch > 16:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return [{"segmentation": np.ones(img.shape[:2], np.uint8), "area": 12}]

    backend = generate_masks.SamBackend(generator=Generator(), device="cpu")
    assert backend(np.zeros((3, 4, 3), np.uint8))[0]["area"] == 12
    assert backend.generator.points_per_batch == 16
    assert "64 point prompts per batch on a 4x3 image: 32 from now on" in capsys.readouterr().err
    assert "points_per_batch" not in backend.settings  # the same masks: the files stay valid
