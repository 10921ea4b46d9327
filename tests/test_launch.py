"""launch/: every script's --dry-run, and the Colab notebook executed top to bottom on CPU."""

import json
import os
import shlex
import subprocess

import pytest

import cpu_flags

from tdm_jax.convert import folders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")


def dry_run(script, *args, env=None):
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry-run", *args], cwd="/",
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return [line for line in result.stdout.splitlines() if line and not line.startswith("#")], result.stdout


def test_local_dry_run_starts_every_process_with_the_same_command():
  lines, _ = dry_run("local.sh", "--processes", "3", "--devices-per-process", "4", "--port", "9999",
                     "configs/shapes.py", "/shared/run", "--config.train.num_iterations=5")
  assert len(lines) == 3
  words = [shlex.split(line) for line in lines]
  for i, argv in enumerate(words):
    env = dict(w.split("=", 1) for w in argv[1:] if "=" in w and not w.startswith("--"))
    assert env["TDM_COORDINATOR_ADDRESS"] == "127.0.0.1:9999" and env["TDM_NUM_PROCESSES"] == "3"
    assert env["TDM_PROCESS_ID"] == str(i)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  commands = [argv[argv.index("python"):] for argv in words]
  assert commands[0] == commands[1] == commands[2]
  assert commands[0] == ["python", "-m", "tdm_jax.main", "--jax_distributed", "--config=configs/shapes.py",
                         "--workdir=/shared/run", "--config.train.num_iterations=5"]


def test_local_dry_run_one_process_needs_no_distributed_setup():
  lines, _ = dry_run("local.sh", "configs/shapes.py", "/tmp/my run")
  assert len(lines) == 1 and "--jax_distributed" not in lines[0] and "TDM_" not in lines[0]
  assert shlex.split(lines[0])[-1] == "--workdir=/tmp/my run"


def test_slurm_dry_run_one_srun_over_every_node():
  lines, text = dry_run("slurm_gpu.sbatch", "configs/sdxl.py", "/shared/runs/sdxl", "--config.train.batch_size=128",
                        env={"SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]"})
  assert "4 node(s)" in text and "gpu[01-04]" in text and "SLURM_PROCID" in text
  srun = shlex.split(next(line for line in lines if line.startswith("srun")))
  assert "--ntasks-per-node=1" in srun and f"--chdir={REPO}" in srun
  assert srun[srun.index("python"):] == ["python", "-m", "tdm_jax.main", "--jax_distributed",
                                         "--config=configs/sdxl.py", "--workdir=/shared/runs/sdxl",
                                         "--config.train.batch_size=128"]
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
    header = [line for line in f if line.startswith("#SBATCH")]
  assert any("--ntasks-per-node=1" in line for line in header) and any("--gpus-per-node" in line for line in header)


def test_tpu_pod_dry_run_creates_installs_runs_everywhere_and_copies_out():
  lines, text = dry_run("tpu_pod.sh", "--create", "v5litepod-16", "--queued", "--bucket", "gs://my-bucket",
                        "--copy-out", "/tmp/results", "my-tpu", "us-west4-a", "configs/sdxl.py", "runs/sdxl",
                        "--config.train.num_iterations=1000")
  argvs = [shlex.split(line) for line in lines]
  assert "queued-resources" in argvs[0] and "--accelerator-type=v5litepod-16" in argvs[0]
  assert "describe my-tpu" in text  # reused when it exists
  ssh = [a for a in argvs if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert ssh and all("--worker=all" in a for a in ssh)  # install, mount and run on every worker
  commands = [a[-1] for a in ssh]
  assert any("pip install" in c and ".[tpu]" in c for c in commands)
  assert any("gcsfuse" in c and "my-bucket /mnt/tdm" in c for c in commands)
  run = [c for c in commands if "tdm_jax.main" in c]
  assert len(run) == 1  # one command, the same on all workers, with a workdir they share (the bucket mount)
  assert "--jax_distributed --config=configs/sdxl.py --workdir=/mnt/tdm/runs/sdxl" in run[0]
  assert "--config.train.num_iterations=1000" in run[0]
  copies = [a for a in argvs if "scp" in a and "--worker=0" in a]
  assert {a[a.index("--recurse") + 1].rsplit("/", 1)[-1] for a in copies} >= {"eval", "export", "metrics.jsonl"}


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_without_arguments_print_usage(script):
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SLURM_SUBMIT_DIR": REPO})
  assert result.returncode == 2 and "usage:" in result.stderr


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  """The Colab notebook executed top to bottom on CPU, shortened: (executed notebook, its shapes workdir)."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  tmp_path = tmp_path_factory.mktemp("notebook")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook with its outputs stripped"
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  workdir = tmp_path / "shapes"
  params.source += "\n".join([
      "", f"REPO = {REPO!r}", "INSTALL = False", f"WORKDIR = {str(workdir)!r}",
      "ITERATIONS = 2", "BATCH_SIZE = 8", "EVAL_SAMPLES = 4",
      "EVAL_OVERRIDES = {'teacher_steps': (2,), 'student_steps': (1,), 'samples_per_prompt': 2}"])
  env = {"XLA_FLAGS": cpu_flags.xla_flags(2), "JAX_PLATFORMS": "cpu"}  # two cores for the mesh
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb, workdir


def test_colab_notebook_runs_top_to_bottom_on_cpu(notebook_run):
  nb, workdir = notebook_run
  texts = [o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
  assert any("2 CPU core(s)" in t for t in texts)
  assert any("distilled to iteration 2" in t for t in texts)
  shown = [o["data"] for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"]
  tables = [d["text/markdown"] for d in shown if "text/markdown" in d]
  assert tables and "| teacher" in tables[0] and "| student" in tables[0]
  assert any("image/png" in d for d in shown)
  assert any(f"tdm_jax from {os.path.join(REPO, 'tdm_jax')}" in t for t in texts)
  assert any("SDXL_PIPELINE is empty" in t for t in texts)
  # The main command's run (configs/shapes.py, shortened): converted, distilled, exported, evaluated.
  rows = json.loads((workdir / "eval" / "table.json").read_text())
  # The unified student at 1 step by our sampler, then its exported pipeline_1step called by stock Diffusers.
  assert [(r["model"], r["nfe"]) for r in rows] == [("teacher", 4), ("student", 1), ("diffusers", 1)]
  assert abs(rows[1]["fd"] - rows[2]["fd"]) < 1e-3 * rows[1]["fd"]
  for row in rows:
    assert 0.0 <= row["adherence"] <= 1.0 and row["fd"] > 0 and row["diversity"] >= 0 and row["ms_per_image"] > 0
    assert (workdir / row["grid"]).is_file()
  assert (workdir / "eval" / "comparison.png").is_file() and (workdir / "eval" / "table.md").is_file()
  for k in (1, 2, 4):
    index = folders.read_model_index(str(workdir / "export" / f"pipeline_{k}step"))
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "DDIMScheduler"
  assert os.path.isdir(workdir / "converted" / "params")


# The shapes default's numbers before the backbone seam (issue 20) was cut: what the notebook's shortened run
# (2 iterations, batch 8, 2 devices) measured at commit 650d5eb, and what stock Diffusers draws from each
# exported pipeline_{K}step. A refactor that changes the computation of the UNet path fails here.
PINNED = os.path.join(REPO, "tests", "data", "pinned_shapes.npz")
PINNED_PROMPTS = ["a small red circle in the top left on a white background",
                  "a large blue square in the center and a small yellow triangle in the bottom right on a gray "
                  "background"]


def test_shapes_default_losses_and_exported_images_are_pinned(notebook_run):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  _, workdir = notebook_run
  pinned = np.load(PINNED)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
  assert metrics["step"] == 2
  for key in ("fake_loss", "generator_loss", "fake_weight", "normalizer", "fake_grad_norm", "student_grad_norm"):
    np.testing.assert_allclose(metrics[key], pinned["metric_" + key], rtol=1e-4, err_msg=key)
  rows = json.loads((workdir / "eval" / "table.json").read_text())
  np.testing.assert_allclose([r["fd"] for r in rows], pinned["fd"], rtol=1e-3)
  z = torch.from_numpy(np.array(jax.random.normal(jax.random.PRNGKey(3), (2, 4, 8, 8)), np.float32))
  for k in (1, 2, 4):
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(workdir / "export" / f"pipeline_{k}step"),
                                                       add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PINNED_PROMPTS, num_inference_steps=k, latents=z.clone(), output_type="np").images
    np.testing.assert_allclose(images, pinned[f"images_{k}step"].astype(np.float32), atol=2e-3, err_msg=f"K={k}")
