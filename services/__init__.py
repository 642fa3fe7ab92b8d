# Importing libs first puts the generated `sophia.*` stubs on the import path for every service module.
import libs  # noqa: F401
