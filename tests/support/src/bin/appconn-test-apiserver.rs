//! Runs the test API server on its own so a person can point kubectl at it:
//! `appconn-test-apiserver --port 8080`, then `kubectl --server http://127.0.0.1:8080 ...`.

use appconn_testkit::apiserver::TestApiServer;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut port = 0u16;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => match args.next().and_then(|p| p.parse().ok()) {
                Some(p) => port = p,
                None => {
                    eprintln!("--port needs a port number");
                    std::process::exit(2);
                }
            },
            "-h" | "--help" => {
                println!("usage: appconn-test-apiserver [--port N]");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: appconn-test-apiserver [--port N]");
                std::process::exit(2);
            }
        }
    }
    let server = TestApiServer::start_at(port).await;
    println!("{}", server.url());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("waiting for Ctrl-C failed: {e}");
    }
    drop(server);
}
