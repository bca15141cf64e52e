"""Run inside a virtual environment that has SkyPilot: parses each YAML given on the command
line as SkyPilot does (`sky.Task.from_yaml`, which also builds the SkyServe service spec) and
prints what it understood as JSON."""

import json
import sys

import sky

out = {}
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    service = task.service
    out[path] = {
        "name": task.name,
        "accelerators": sorted(f"{name}:{count}" for r in task.resources for name, count in (r.accelerators or {}).items()),
        "has_setup": bool(task.setup),
        "setup": task.setup or "",
        "file_mounts": {str(k): str(v) for k, v in (task.file_mounts or {}).items()},
        "has_run": bool(task.run),
        "service": None if service is None else {
            "readiness_path": service.readiness_path,
            "min_replicas": service.min_replicas,
            "max_replicas": service.max_replicas,
        },
    }
print(json.dumps(out))
