"""The kernel's HMM selftests (``tools/testing/selftests/mm/hmm-tests.c``) ported to run
against the model, with the kselftest harness they use (:mod:`.harness`)."""
