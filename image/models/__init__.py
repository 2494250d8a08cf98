"""The models behind the operations, one module per concern.

    registry   which repository, revision and files each operation runs (`REGISTRY`)
    lock       the committed pins: commit and file sizes per repository
    store      the local Hugging Face cache: pull, resolve, verify, list
    loading    `load_model`: a snapshot on disk -> a pipeline or network on a device
    tiny       small random-weight stand-ins under the real names, for tests and demos
    tokenizer  the tiny models' CLIP vocabulary
"""
