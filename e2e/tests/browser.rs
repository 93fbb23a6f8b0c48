//! The gateway's try-it page in headless Chromium (issue 6): two browser pages, each mints a
//! token in the page, connects over WebSocket and sends the other one message; both
//! messages are delivered and acked through the real gateway, broker and writer.
//! `scripts/dev test` installs Debian's chromium and playwright-core (CHATIFY_PLAYWRIGHT_DIR).

use chatify_e2e::stack::{JWT_SECRET, Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_exchange_a_message_each_way() {
    let playwright = std::env::var("CHATIFY_PLAYWRIGHT_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/chatify/playwright",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        std::path::Path::new(&playwright)
            .join("node_modules/playwright-core")
            .is_dir(),
        "playwright-core is not installed in {playwright}: scripts/dev test installs it"
    );
    let stack = Stack::start(StackOptions {
        reader: false,
        ..StackOptions::default()
    })
    .await;
    let gateway = &stack.gateways[0];
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/two_pages.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .env("CHATIFY_PAGE_URL", format!("http://{}/", gateway.ws))
        .env("JWT_SECRET", JWT_SECRET)
        .env("USER_A", stack.user("ann"))
        .env("USER_B", stack.user("ben"))
        .env("CHATIFY_PLAYWRIGHT_DIR", &playwright)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run node (scripts/dev test checks it is installed)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("BROWSER TEST PASSED"),
        "browser test failed ({}):\n{stdout}\n{stderr}\n{}",
        output.status,
        stack.logs()
    );
}
