"""qpipe: build, gate and compare quantized LLM artifacts with DVC.

Design (the code's twin of DESIGN.md; change both together):

    params.yaml, recipes/*.yaml
    host      -> artifacts/host.json        CPU/GPU, measured bandwidth, runtimes; always re-run,
                                             rewritten identically while the host is unchanged
    source    -> artifacts/source/          HF checkpoint + source.json (origin, sha256 of every file,
                                             parameter count); refused (exit 2) unless transformers knows
                                             the architecture, the tokenizer loads and the weights read
    corpus    -> artifacts/corpus/          calibration.txt / evaluation.txt, disjoint
    reference -> artifacts/reference/       eval token windows, the unquantized model's NLL, the input of
                                             its output layer at every position and the layer, from which
                                             each gate recomputes the full-vocabulary distribution
    recipe@R  -> artifacts/recipes/R.json   the validated recipe's build knobs (limits excluded, so
                                             tuning a limit re-runs the gate, not the build), plus
                                             the host facts a build depends on (AWQ: cpu or cuda)
    build@R   -> artifacts/builds/R/        the artifact + build.json (recipe, tools, timings, sizes)
                                             or a `refused` build.json when R cannot apply to the model
    engine@R  -> artifacts/engines/R/       format modelopt: a TensorRT engine (trtllm-build, TensorRT-LLM
                                             1.2.x, CUDA) in <sm>-trt<version>/, else engine.json saying
                                             not_run and why; other formats: not_applicable
    baseline  -> artifacts/baselines/F.json the unquantized model's speed per format F on the native
                                             runtime (for decode_speedup)
    gate@R    -> artifacts/gates/R.json     accuracy + speed + checks + verdict (DVC metrics); limits are
                                             the recipe's with params `limits.R` applied; a limit relative
                                             to another recipe leaves the verdict `pending`
    report    -> artifacts/report/          tradeoff.md/json, pareto.png, quality_vs_size.png, points.json
                                             (DVC plots), with relative limits judged across the run
                                             (gates.verdict.resolve) and ties within the measured noise
    check                                   exit 1 unless every recipe's verdict is pass

Modules: cli (Typer), config (pydantic params/recipes), errors (exit codes), host, source,
corpus, reference, formats/<one per format: gguf, awq, modelopt>, runtimes/<one per runtime:
llama_cpp, transformers, vllm, tensorrt_llm, checkpoint_emulation>, engines (engine@R), gates/accuracy,
gates/speed, gates/verdict, report, compare (across `dvc exp` experiments; recommend),
publish (staging, model card, provenance) with registries/<one per registry: directory,
oci, hub>, memory (each heavy stage's peak estimated from the config before it loads; exit 3
when the host cannot hold it), files (atomic writes), layout (paths).

Not stages: `qpipe publish` (after a green repro), `qpipe compare` and `qpipe recommend`.
Gate results (artifacts/gates/*.json, DVC metrics, cache: false) are committed to git so that
DVC keeps them for every commit and experiment.

Rules that keep the numbers honest: accuracy scores the artifact as written to disk through
its native runtime, else through another runtime that reads the format itself (transformers
for compressed-tensors, named as such) or a declared emulation (`emulated:<how>`); speed only on the
native runtime, else `not_run`; every format is scored on the same token ids against the same
reference; calibration and evaluation text never overlap; a gate that did not run is never a pass.
"""

__version__ = "0.1.0"
