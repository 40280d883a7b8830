"""`weakloc label --runner DataflowRunner` translated into a Dataflow job, not submitted (`--dry_run`).

No cloud account here, so gs:// is played by a local folder: `FileSystems` is pointed, for gs:// paths only, at
Beam's LocalFileSystem under a temp root (gs://bucket/key <-> root/bucket/key). The launcher's checks (inputs
match, the model loads and has a GAP head, the output is empty) then run for real on gs:// paths; the runner
translates the pipeline, stages nothing and submits nothing. What this cannot show is a real GCS or a real
Dataflow worker: see the README for running it on a project.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tarfile

import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.portability.api import beam_runner_api_pb2

# The test extra installs apache-beam[gcp]: without it DataflowRunner cannot even import, and this should fail.
from apache_beam.runners.dataflow import dataflow_runner  # noqa: F401

from weakloc.models import records, synthetic
from weakloc.pipeline import label
from weakloc.pipeline.options import OptionsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FolderAsGcs:
    """The FileSystem calls the launcher makes, for gs:// paths, served from a local folder (tests only).

    Not a FileSystem subclass on purpose: Beam registers every subclass by scheme, and a second one for local
    paths would make Beam refuse local paths everywhere else in the test session.
    """

    def __init__(self, root: str):
        self.root = root
        self.local = LocalFileSystem(None)

    def _local(self, path: str) -> str:
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://"):])

    def _gs(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root)

    def join(self, base, *parts):
        return posixpath.join(base, *parts)

    def split(self, path):
        return posixpath.split(path)

    def exists(self, path):
        return self.local.exists(self._local(path))

    def match(self, patterns, limits=None):
        found = self.local.match([self._local(p) for p in patterns], limits)
        return [MatchResult(p, [FileMetadata(self._gs(m.path), m.size_in_bytes, m.last_updated_in_seconds)
                                for m in r.metadata_list]) for p, r in zip(patterns, found)]

    def open(self, path, *args, **kwargs):
        return self.local.open(self._local(path), *args, **kwargs)

    def create(self, path, *args, **kwargs):
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return self.local.create(self._local(path), *args, **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    root.mkdir()
    fake = _FolderAsGcs(str(root))
    real = FileSystems.get_filesystem
    monkeypatch.setattr(FileSystems, "get_filesystem",
                        staticmethod(lambda path: fake if path.startswith("gs://") else real(path)))
    return root


@pytest.fixture
def bucket(fake_gcs, tiny_model_path):
    """gs://bucket with a shard, the tiny model and its sidecar."""
    b = fake_gcs / "bucket"
    (b / "shards").mkdir(parents=True)
    (b / "models").mkdir()
    data = synthetic.make_shapes(2, size=32, seed=1)
    (b / "shards" / "train-00000-of-00001.tfrecord").write_bytes(b"".join(
        records.frame_record(records.make_example(synthetic.encode_png(img))) for img in data.images))
    shutil.copy(tiny_model_path, b / "models" / "cls.keras")
    shutil.copy(tiny_model_path[:-len(".keras")] + ".json", b / "models" / "cls.json")
    return b


def _dataflow_argv(*extra):
    return ["--input", "gs://bucket/shards/train-*.tfrecord", "--model", "gs://bucket/models/cls.keras",
            "--output", "gs://bucket/weak_labels/run1", "--runner=DataflowRunner", "--project=my-project",
            "--region=europe-west4", "--temp_location=gs://bucket/tmp", "--dry_run=True", *extra]


def test_dataflow_job_is_translated_from_gs_paths_with_the_setup_file(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # --setup_file ./setup.py as the README says, run from the repository
    config, result = label.start(_dataflow_argv(
        "--setup_file=./setup.py", "--sdk_container_image=europe-docker.pkg.dev/my-project/weakloc/gpu:1",
        "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
        "--job_name=weakloc-dry-run"))
    # The launcher read the model from gs:// and found its head and sidecar.
    assert config.spec.path == "gs://bucket/models/cls.keras" and config.spec.class_names == ("cat", "dog", "bird")
    assert config.sidecar_used == "gs://bucket/models/cls.json"
    job = result.job
    assert job.proto.name == "weakloc-dry-run"
    assert job.options.get_all_options()["dataflow_service_options"] == [
        "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]
    proto = job.proto_pipeline
    names = {t.unique_name for t in proto.components.transforms.values()}
    for step in ("Read/Open", "Decode", "CamInference/BeamML_RunInference", "Write/WriteAnnotations",
                 "Write/WriteSummary"):
        assert any(n == step or n.startswith(step + "/") for n in names), (step, sorted(names)[:20])
    # Workers run our container and install weakloc from the sdist that --setup_file built.
    (env,) = {e.SerializeToString(): e for e in proto.components.environments.values()}.values()
    payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload)
    assert payload.container_image == "europe-docker.pkg.dev/my-project/weakloc/gpu:1"
    staged = [beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
              for d in env.dependencies]
    assert "workflow.tar.gz" in staged, staged
    # ...and that sdist holds the code and the data file keras:NAME needs on workers.
    sdist = next(beam_runner_api_pb2.ArtifactFilePayload.FromString(d.type_payload).path for d in env.dependencies
                 if beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
                 == "workflow.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {posixpath.relpath(n, n.split("/")[0]) for n in tar.getnames()}
    assert {"models/gradcam.py", "models/imagenet_classes.tsv", "pipeline/label.py", "setup.py"} <= members
    assert not any(p.name.startswith("weak_labels") for p in bucket.iterdir()), "a dry run writes nothing"


def test_dataflow_refuses_local_paths_before_translating(bucket, tiny_model_path):
    argv = _dataflow_argv()
    argv[argv.index("gs://bucket/models/cls.keras")] = tiny_model_path
    with pytest.raises(OptionsError, match=r"DataflowRunner workers cannot read local paths: \['--model "):
        label.start(argv)


def test_dataflow_cpu_workers_get_the_openvino_graph_under_temp_location(bucket, monkeypatch, tmp_path):
    from weakloc.models import engines, files

    if not engines.get("openvino").available():
        pytest.skip("needs openvino (pip install openvino)")
    monkeypatch.setenv("WEAKLOC_CACHE_DIR", str(tmp_path / "cache"))
    config, _ = label.start(_dataflow_argv("--job_name=weakloc-dry-run-cpu"))
    converted = config.spec.converted
    assert config.engine["name"] == "openvino" and converted.path.startswith("gs://bucket/tmp/weakloc-engines/")
    shipped = bucket / "tmp" / "weakloc-engines" / converted.path.rsplit("/", 1)[1]
    assert files.local_fingerprint(str(shipped)) == converted.fingerprint  # what workers will check
