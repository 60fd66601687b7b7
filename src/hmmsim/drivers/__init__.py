"""Device drivers: ``test_hmm`` (the dmirror device) and device-dax. Importing the
package registers their modules."""

from . import dax, dmirror  # noqa: F401
