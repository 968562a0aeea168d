"""What mobiflower is measured against: on-device LoRA, full fine-tuning and zero-shot on one device
(:mod:`.on_device`), and federated on-device LoRA as its own Flower app (:mod:`.fed_lora` runs it;
:mod:`.fed_lora_strategy`, :mod:`.fed_lora_server_app`, :mod:`.fed_lora_client_app` and
:mod:`.lora_model` are its server and device halves)."""
