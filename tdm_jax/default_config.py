"""The base configuration: every field any run reads, with TDM.md's demo defaults.

`configs/default.py` is its entry for `--config`.

Per-model configs start from this one and change only what differs. It is returned locked:
a key that does not exist here is an error (with the nearest valid keys), whether it comes
from a config file or a `--config.a.b=...` override.
"""

import ml_collections

from tdm_jax.infra import sharding


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = "toy"  # which teacher and data: "toy" (the vector example)
  # JAX's persistent compilation cache: a folder (local, or a gs:// URL) where every compiled program is
  # kept, so that a later run with the same programs, devices and JAX version loads them instead of
  # compiling (its "compiled in" time drops); "" leaves it off. Set once at start, for every mode.
  # On XLA:CPU the SDXL step's 21 MB entry took longer to load than to compile (benchmarks/README.md).
  config.compilation_cache = ""

  # The teacher's noise schedule, in Diffusers' scheduler_config.json terms.
  config.schedule = ml_collections.ConfigDict(dict(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
      prediction_type="epsilon"))

  # Trajectory Distribution Matching: every option of TDM.md (see tdm_jax/core/tdm.py: TDMConfig).
  config.tdm = ml_collections.ConfigDict(dict(
      num_student_steps=4, total_steps=800, guidance_scale=2.0, interval_mode="separate", random_mid=False,
      min_timestep=20, upper_margin=10, mid_margin=20, min_snr_gamma=5.0, importance_weighting=True,
      loss_type="huber", huber_c=1e-3, huber_norm_coef=0.00054, normalizer_floor=1e-8,
      step_choices=(), step_weights=(), condition_fake_on_segment=False,
      student_shift=0.0,  # flow teachers: the student's grid warp k (0: the teacher's shift)
      # VP teachers: the K-step student's timesteps given outright, highest first (the TDM authors'
      # CogVideoX-2B LoRA: (999, 856, 665, 399)), for K = their count; () or other K: the rule above.
      student_timesteps=()))

  # AdamW (betas 0, 0.95) for both networks; the student at lr / 5 with warm-up + cosine.
  config.optim = ml_collections.ConfigDict(dict(
      fake_lr=1e-4, student_lr=2e-5, b1=0.0, b2=0.95, eps=1e-8, weight_decay=1e-2,
      student_grad_clip=1.0, fake_grad_clip=0.0, student_schedule="cosine", student_warmup_steps=50,
      fake_schedule="constant", fake_warmup_steps=0, final_lr_fraction=0.0,
      decay_steps=0,  # cosine horizon; 0: train.num_iterations (the authors' command decays over 10,001)
      lr_scales=()))  # (path regex, factor) pairs: learning-rate multipliers per parameter group

  # Metrics are fetched from the device (a wait for it) only every log_every iterations, before each
  # checkpoint and at the end; they are checked for NaN/Inf there and written with iterations_per_s.
  config.train = ml_collections.ConfigDict(dict(
      num_iterations=500, batch_size=32, checkpoint_every=100, keep_checkpoints=3, log_every=10,
      ema_decay=0.0, progress=True, tensorboard=True, evaluate_after=True,
      export_after=True,  # Diffusers pipelines write WORKDIR/export when training ends
      # Checkpoints are written by a background thread while training goes on (still atomic: a
      # temporary folder renamed when complete); the run ends once the last one is on disk.
      async_checkpoint=True,
      # (first_step, count): a profiler trace of iterations first_step..first_step+count-1 (by the step
      # they start from) in WORKDIR/profile (TensorBoard's profile plugin, Perfetto); () for none.
      profile_steps=(),
      # A new stage of a recipe: a workdir whose latest checkpoint's student (its EMA if kept) starts
      # this run; the fake score and the optimisers start afresh. Used only when WORKDIR has no checkpoint.
      init_from=""))

  # Devices: (data, fsdp, tensor); -1 takes all remaining devices. Parameters are placed by their
  # logical axis names through `rules` (logical name, mesh axis or None), in order; every leaf of at
  # least `min_shard_size` elements is split over fsdp (tdm_jax/infra/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=sharding.DEFAULT_RULES,
                                               min_shard_size=sharding.DEFAULT_MIN_SIZE))

  # Prompts to distil on (Diffusers pipelines): a .txt file, one per line, a .jsonl file with a "prompt"
  # field, or tfds:NAME (NAME[:VERSION]), a TFDS dataset in tfds_data_dir read per process without
  # TensorFlow (write one with `python -m tdm_jax.infra.data PROMPTS.txt --name=NAME --data_dir=DIR`).
  config.data = ml_collections.ConfigDict(dict(prompt_source="", tfds_split="train", tfds_text_field="text",
                                               tfds_data_dir=""))

  config.model = ml_collections.ConfigDict()  # filled by the per-model config
  config.teacher = ml_collections.ConfigDict()  # where the teacher comes from
  config.eval = ml_collections.ConfigDict(dict(
      num_samples=1000, student_steps=(1, 2, 4), teacher_steps=(4,), reference_steps=100,
      reference_solver="ddim", student_solver="ddim",
      # Diffusers pipelines: num_samples prompts from prompt_file (default: data.prompt_source), each
      # sampled samples_per_prompt times; classifier: an attribute-classifier folder that scores
      # shapes captions (FD, adherence, diversity), "" for none.
      prompt_file="", samples_per_prompt=1, classifier=""))
  # --mode=sample (Diffusers pipelines; prompts from --prompt / --prompt_file): the student of checkpoint
  # `checkpoint` (-1: the latest) at `student_steps` (empty: the counts it was trained for), beside the
  # teacher at `teacher_steps` with CFG (0: no teacher), all from the noise of `seed`.
  config.sample = ml_collections.ConfigDict(dict(checkpoint=-1, student_steps=(), teacher_steps=25, seed=0))
  config.lock()
  return config


def diffusers_config(**model) -> ml_collections.ConfigDict:
  """The base config for a Diffusers pipeline teacher (config.task "diffusers"): `model` and
  `teacher` filled with their fields, `model` keyword arguments overriding the defaults."""
  config = get_config()
  config.task = "diffusers"
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(
        reference="",  # a folder of published configs (no weights), for shape-only work
        resolution=0,  # pixels of a square frame; 0: the denoiser's sample size times the VAE's factor
        height=0, width=0,  # pixels of a non-square frame (both set: they override resolution)
        num_frames=0,  # video teachers: pixel frames per clip, 1 + k x the VAE's temporal factor; 0: the denoiser's
        dtype="bfloat16",  # compute dtype of the UNet
        teacher_dtype="bfloat16",  # the frozen teacher's stored dtype (student and fake score: float32)
        attention="auto",  # cuDNN flash attention on GPUs, blocked attention on CPU, plain for short sequences
        remat=True,
        # LoRA: student and fake score are adapters over the one frozen teacher (lora_rank 0: full
        # float32 copies of the denoiser, for small models). Targets are regexes over parameter paths;
        # () takes the denoiser family's own (attention projections and feed-forward kernels).
        lora_rank=0, lora_alpha=0.0,  # alpha 0: alpha = rank (scale 1)
        lora_targets=(),
        # T5 tokens per prompt (PixArt, SD3); 0: the pipeline family's (120 / 300 / 256). Exports record it,
        # and their stock calls pass it as max_sequence_length.
        max_sequence_length=0))
    config.model.update(model)
    # S = the teacher's num_train_timesteps (1000 for SD and SDXL): a stock DDIM scheduler with "trailing"
    # spacing then gives the student's timesteps (999/749/499/249 for K = 4), so the exported student
    # samples right in a stock Diffusers call (tdm_jax/convert/student.py).
    config.tdm.total_steps = 1000
    config.teacher = ml_collections.ConfigDict(dict(
        pipeline="",  # a Diffusers folder (model_index.json, unet/, text_encoder*/, vae/, ...)
        converted="",  # a converted checkpoint folder to reuse (default: WORKDIR/converted)
        variant="",  # e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors
        allow_pickle=False))  # load pickled .bin weights (only from sources you trust)
  # Empty teacher.pipeline with model.reference set: random weights made on the mesh from the
  # published configs (no weights needed), for benchmarks and dry runs.
  config.lock()
  return config
