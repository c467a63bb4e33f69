"""Package init: quiet one known warning of the pinned stack (see below)."""

import warnings

# transformers 4.33 (pinned for ChatGLM-6B's code) calls a torch helper that torch 2.13 deprecates; every
# command printed the FutureWarning on import. It is about transformers' internals, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*_register_pytree_node.* is deprecated", category=FutureWarning)
