"""The hub's routes, one router per protocol: adapterkit's JSON API (:mod:`.api`), the Hugging Face Hub's
(:mod:`.hf`) and the HTML pages (:mod:`.pages`)."""
