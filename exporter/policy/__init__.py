"""Start block pulls from a YAML policy (``--policy.file``); dry run unless ``--policy.enforce``.

``config`` parses the file, ``decide`` is the pure decision function, ``space`` estimates disk
space from the image files, ``engine`` is the thin stateful layer the exporter drives, and
``commands`` backs ``policy check`` / ``policy plan``. See docs/policy.md.
"""
