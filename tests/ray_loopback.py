"""Run the ``ray`` CLI or a Python module with Ray kept on loopback (the test clusters' wrapper).

Ray replaces 127.0.0.1 in ``--node-ip-address`` and ``ray.init(address=...)`` with the machine's
outward address, so that other machines could reach the node. A test cluster on one machine
must stay on loopback, so each of its processes (nodes and driver) starts through this file::

    python tests/ray_loopback.py ray start --head --node-ip-address 127.0.0.1 ...
    python tests/ray_loopback.py -m pipeline.clean --runner ray --ray-address 127.0.0.1:PORT ...

On a real cluster none of this is needed: the commands are the same without the wrapper.
"""
import runpy
import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    if sys.argv[1:2] == ["ray"]:
        from ray.scripts.scripts import main

        sys.argv = ["ray", *sys.argv[2:]]
        sys.exit(main())
    elif sys.argv[1:2] == ["-c"]:
        exec(compile(sys.argv[2], "<ray_loopback -c>", "exec"))  # noqa: S102 - the test's own probe
    elif sys.argv[1:2] == ["-m"]:
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.exit("usage: ray_loopback.py ray ARGS... | -m MODULE ARGS... | -c CODE")
