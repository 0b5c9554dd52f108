"""Log and register an ONNX GenAI model folder with the MLflow Python client, the two ways
the Phi-3 cookbook does it. Used by the registry tests and the pull benchmark.

    log_model.py --tracking-uri URI --name NAME --model-dir DIR
                 [--flavor pyfunc|onnx|transformers] [--artifact-key KEY]
                 [--stage STAGE] [--alias ALIAS] [--tag k=v ...]

Prints one JSON object: {"name", "version", "source", "run_id"}.

- pyfunc: a custom PythonModel wrapper with the folder as an artifact under `--artifact-key`
  (MLmodel: flavors.python_function.artifacts.<key>.path).
- onnx: the `onnx` flavor: the graph is re-saved by MLflow with its weights in an external
  data file of a generated name; every other file of the folder goes in as extra_files.
- transformers: an MLmodel that declares only a `transformers` flavor (no ONNX), for the
  rejection test; written by hand so the test does not need torch.
- traversal: a pyfunc MLmodel whose artifact path climbs out of the model folder
  (`../../..`), as a hostile or broken registry entry would.
"""
import argparse
import json
import os
import sys
import tempfile

# MLflow's usage telemetry: no phoning home from tests, and no race in it (3.17's client
# deletes its session id from os.environ on one thread while another reads it: a KeyError
# that failed a log_model under load).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


class GenaiWrapper(mlflow.pyfunc.PythonModel):
    """The cookbook's wrapper: it would run onnxruntime-genai over context.artifacts[key]."""

    def load_context(self, context):
        self.model_dir = next(iter(context.artifacts.values()))

    def predict(self, context, model_input, params=None):
        raise NotImplementedError("edgeflow serves this model; the wrapper only carries it")


def log_pyfunc(args):
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=GenaiWrapper(),
        artifacts={args.artifact_key: args.model_dir},
        pip_requirements=["onnxruntime-genai"],
    )


def log_onnx(args):
    import onnx

    with open(os.path.join(args.model_dir, "genai_config.json")) as f:
        decoder = json.load(f)["model"]["decoder"]["filename"]
    graph = onnx.load(os.path.join(args.model_dir, decoder))  # pulls in the external data
    extra = [os.path.join(args.model_dir, n) for n in sorted(os.listdir(args.model_dir))
             if n != decoder and not n.startswith(decoder + ".") and not n.endswith(".onnx.data")]
    return mlflow.onnx.log_model(
        onnx_model=graph,
        name="model",
        extra_files=extra,
        save_as_external_data=True,
        pip_requirements=["onnxruntime"],
    )


HAND_WRITTEN = {
    "transformers": "artifact_path: model\nflavors:\n  transformers:\n    task: text-generation\n"
                    "    instance_type: TextGenerationPipeline\n    framework: pt\n"
                    "    transformers_version: 4.44.0\n    model_binary: model\n"
                    "mlflow_version: 3.17.2\n",
    "traversal": "artifact_path: model\nflavors:\n  python_function:\n    artifacts:\n"
                 "      phi3-mini-onnx:\n        path: ../../../etc\n"
                 "    loader_module: mlflow.pyfunc.model\nmlflow_version: 3.17.2\n",
}


def log_hand_written(args):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "MLmodel"), "w") as f:
            f.write(HAND_WRITTEN[args.flavor])
        os.makedirs(os.path.join(tmp, "model"))
        with open(os.path.join(tmp, "model", "config.json"), "w") as f:
            f.write("{}\n")
        mlflow.log_artifacts(tmp, artifact_path="model")
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--flavor", default="pyfunc", choices=["pyfunc", "onnx", "transformers", "traversal"])
    p.add_argument("--artifact-key", default="phi3-mini-onnx")
    p.add_argument("--stage")
    p.add_argument("--alias")
    args = p.parse_args()

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    with mlflow.start_run() as run:
        if args.flavor == "pyfunc":
            source = log_pyfunc(args).model_uri
        elif args.flavor == "onnx":
            source = log_onnx(args).model_uri
        else:
            log_hand_written(args)
            source = f"runs:/{run.info.run_id}/model"
    mv = mlflow.register_model(source, args.name)
    if args.stage:
        client.transition_model_version_stage(args.name, mv.version, args.stage)
    if args.alias:
        client.set_registered_model_alias(args.name, args.alias, mv.version)
    mv = client.get_model_version(args.name, mv.version)
    json.dump({"name": mv.name, "version": mv.version, "source": mv.source, "run_id": run.info.run_id,
               "status": mv.status}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
