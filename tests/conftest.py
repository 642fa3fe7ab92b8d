import libs  # noqa: F401  (puts the generated stubs on the import path)
