//! Compiles the `.proto` files with protox (a pure-Rust protobuf compiler), so a fresh
//! machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/chatify/client/v1/frames.proto",
        "protos/chatify/bus/v1/records.proto",
        "protos/chatify/storage/v1/storage.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["protos"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("chatify_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Client frames double as the JSON wire format (text WebSocket frames): serde
        // derives on the generated types keep one definition of every frame.
        .message_attribute(
            ".chatify.client.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .enum_attribute(
            ".chatify.client.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\")]",
        )
        // `{"type": "send", ...}`: the oneof of each top-level frame is internally tagged.
        .enum_attribute(
            ".chatify.client.v1.ClientFrame.frame",
            "#[serde(tag = \"type\")]",
        )
        .enum_attribute(
            ".chatify.client.v1.ServerFrame.frame",
            "#[serde(tag = \"type\")]",
        )
        .field_attribute(
            ".chatify.client.v1.ChatMessage.recalled",
            "#[serde(skip_serializing_if = \"std::ops::Not::not\")]",
        )
        // A page is written by hand so the reader can pass cached, already-encoded
        // messages through (src/page.rs); same wire message.
        .extern_path(
            ".chatify.storage.v1.QueryMessagesResponse",
            "crate::page::QueryMessagesResponse",
        );
    // Enum fields are i32 in prost; on the JSON wire they are snake_case strings.
    for (field, module) in [
        (".chatify.client.v1.Send.message_type", "message_type"),
        (
            ".chatify.client.v1.ChatMessage.message_type",
            "message_type",
        ),
        (".chatify.client.v1.Error.code", "error_code"),
        (".chatify.client.v1.Presence.state", "presence_state"),
    ] {
        builder =
            builder.field_attribute(field, format!("#[serde(with = \"crate::json::{module}\")]"));
    }
    // Optional fields are left out of the JSON when absent rather than sent as null.
    for field in [
        "Send.receiver_id",
        "Send.session_id",
        "Send.burn_after_seconds",
        "Send.request_id",
        "Sync.request_id",
        "Recall.request_id",
        "Read.request_id",
        "Messages.request_id",
        "Error.client_msg_id",
        "Error.request_id",
        "Ping.timestamp",
        "Pong.timestamp",
        "ChatMessage.burn_after_seconds",
    ] {
        builder = builder.field_attribute(
            format!(".chatify.client.v1.{field}"),
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        );
    }
    builder.compile_fds(descriptors)?;
    Ok(())
}
