"""Package layout: the core lives in src/metarec; the product folders are mapped under the same
namespace (metarec.components, metarec.pipelines, metarec.serving) so that generic names such as
`components` never land at the top of site-packages. Metadata is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {
    "metarec": "src/metarec",
    "metarec.components": "components",
    "metarec.pipelines": "pipelines",
    "metarec.serving": "serving",
}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder, exclude=["tests", "*.tests"])]

setup(packages=packages, package_dir=package_dir)
