//! User administration over HTTP: create, list, change role / password / disabled; input
//! validation; the last enabled admin stays.

use crate::common::*;
use crate::support::*;
use serde_json::{json, Value};

const LISTED_KEYS: [&str; 4] = ["created_at", "disabled", "role", "username"];

#[track_caller]
fn assert_listed_shape(u: &Value) {
    let mut keys: Vec<&str> = u
        .as_object()
        .expect("a user object")
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, LISTED_KEYS, "{u}");
    let created = u["created_at"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.len() == "2026-01-01T00:00:00.000Z".len(),
        "{created}"
    );
}

async fn list(app: &TestApp) -> Vec<Value> {
    let (s, v) = app.get(&app.admin_token, "/api/v1/users").await;
    assert_eq!(s, 200, "{v}");
    v.as_array().expect("an array").clone()
}

async fn role_of(app: &TestApp, name: &str) -> Value {
    list(app)
        .await
        .into_iter()
        .find(|u| u["username"] == name)
        .map(|u| u["role"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn create_list_and_validation() {
    let app = spawn_app().await;
    let (s, v) = app
        .post(
            &app.admin_token,
            "/api/v1/users",
            json!({"username": "alice", "password": USER_PASSWORD, "role": "operator"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_listed_shape(&v);
    assert_eq!(
        (&v["username"], &v["role"], &v["disabled"]),
        (&json!("alice"), &json!("operator"), &json!(false))
    );

    // Duplicates, also differing only in letter case: 409 with the documented code
    // (README and schemas/openapi.json `UserExists`: `conflict`, an HTTP-only addition).
    for name in ["alice", "ALICE", "Alice"] {
        let got = app
            .post(
                &app.admin_token,
                "/api/v1/users",
                json!({"username": name, "password": USER_PASSWORD, "role": "viewer"}),
            )
            .await;
        assert_error(&got, 409, "conflict");
    }
    // Bad names.
    let long = "a".repeat(65);
    for name in [
        "", " ", "bad name", "-dash", ".dot", "_under", "a/b", "..", "ä", "x\n", &long,
    ] {
        let got = app
            .post(
                &app.admin_token,
                "/api/v1/users",
                json!({"username": name, "password": USER_PASSWORD, "role": "viewer"}),
            )
            .await;
        assert_error(&got, 400, "bad_request");
    }
    // Weak (< 12 characters, counted as characters, not bytes) and absurdly long passwords.
    let huge = "p".repeat(1025);
    for pw in ["", "short", "elevenchars", "ääääääääääß", &huge] {
        let got = app
            .post(
                &app.admin_token,
                "/api/v1/users",
                json!({"username": "weak", "password": pw, "role": "viewer"}),
            )
            .await;
        assert_error(&got, 400, "bad_request");
    }
    // Unknown roles (exact lowercase names only) and missing fields.
    for role in ["root", "Admin", ""] {
        let got = app
            .post(
                &app.admin_token,
                "/api/v1/users",
                json!({"username": "roleless", "password": USER_PASSWORD, "role": role}),
            )
            .await;
        assert_error(&got, 400, "bad_request");
    }
    let got = app
        .post(
            &app.admin_token,
            "/api/v1/users",
            json!({"username": "nopw"}),
        )
        .await;
    assert_error(&got, 400, "bad_request");
    // Exactly 12 characters is enough, and the 64-character name limit is inclusive.
    let max_name = "b".repeat(64);
    let (s, v) = app
        .post(
            &app.admin_token,
            "/api/v1/users",
            json!({"username": max_name, "password": "twelve-chars", "role": "viewer"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    let users = list(&app).await;
    let mut names: Vec<&str> = users
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["admin", "alice", max_name.as_str()]);
    for u in &users {
        assert_listed_shape(u);
    }
    let text = serde_json::to_string(&users).unwrap().to_lowercase();
    for word in ["password", "hash", "salt", "pbkdf2", "iterations"] {
        assert!(!text.contains(word), "{word} in {text}");
    }
    // Listing is admin-only (viewer).
    let viewer = app.login(&max_name, "twelve-chars").await;
    assert_error(&app.get(&viewer, "/api/v1/users").await, 403, "forbidden");
}

#[tokio::test]
async fn patch_role_password_and_disabled() {
    let app = spawn_app().await;
    create_user(&app, "bob", USER_PASSWORD, "viewer").await;

    let (s, v) = patch_user(&app, &app.admin_token, "bob", json!({"role": "operator"})).await;
    assert_eq!(s, 200, "{v}");
    assert_listed_shape(&v);
    assert_eq!(v["role"], "operator");

    let old_token = app.login("bob", USER_PASSWORD).await;
    next_second().await;
    let new_pw = "a brand new password";
    let (s, v) = patch_user(&app, &app.admin_token, "bob", json!({"password": new_pw})).await;
    assert_eq!(s, 200, "{v}");
    assert_listed_shape(&v);
    assert_eq!(login_raw(&app, "bob", USER_PASSWORD, None).await.0, 401);
    let new_token = app.login("bob", new_pw).await;
    // A password change revokes the tokens issued before it.
    assert_error(
        &app.get(&old_token, "/api/v1/alarms").await,
        401,
        "unauthorized",
    );
    assert_eq!(app.get(&new_token, "/api/v1/alarms").await.0, 200);

    let (s, v) = patch_user(&app, &app.admin_token, "bob", json!({"disabled": true})).await;
    assert_eq!((s, &v["disabled"]), (200, &json!(true)), "{v}");
    assert_eq!(login_raw(&app, "bob", new_pw, None).await.0, 401);
    assert_eq!(
        list(&app)
            .await
            .iter()
            .find(|u| u["username"] == "bob")
            .unwrap()["disabled"],
        true
    );
    let (s, v) = patch_user(&app, &app.admin_token, "bob", json!({"disabled": false})).await;
    assert_eq!((s, &v["disabled"]), (200, &json!(false)), "{v}");
    assert_eq!(login_raw(&app, "bob", new_pw, None).await.0, 200);

    // Several fields at once.
    let (s, v) = patch_user(
        &app,
        &app.admin_token,
        "bob",
        json!({"role": "viewer", "password": USER_PASSWORD, "disabled": false}),
    )
    .await;
    assert_eq!((s, &v["role"]), (200, &json!("viewer")), "{v}");
    let (s, _, v) = login_raw(&app, "bob", USER_PASSWORD, None).await;
    assert_eq!((s, &v["user"]["role"]), (200, &json!("viewer")));
}

#[tokio::test]
async fn bad_patches_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    create_user(&app, "carl", USER_PASSWORD, "viewer").await;
    let token = app.login("carl", USER_PASSWORD).await;

    assert_error(
        &patch_user(&app, &app.admin_token, "nobody", json!({"role": "viewer"})).await,
        404,
        "not_found",
    );
    for body in [
        json!({}),
        json!({"role": "root"}),
        json!({"password": "short"}),
        json!({"disabled": "yes"}),
        json!({"username": "renamed"}),
        json!({"role": "viewer", "hash": "x"}),
    ] {
        let got = patch_user(&app, &app.admin_token, "carl", body.clone()).await;
        assert_error(&got, 400, "bad_request");
    }
    // A patch is all or nothing: a valid role with an invalid password must not half-apply
    // (promote carl and then fail).
    let got = patch_user(
        &app,
        &app.admin_token,
        "carl",
        json!({"role": "admin", "password": "short"}),
    )
    .await;
    assert_error(&got, 400, "bad_request");
    assert_eq!(role_of(&app, "carl").await, "viewer");
    // Nothing above revoked carl's token or changed his password.
    assert_eq!(app.get(&token, "/api/v1/alarms").await.0, 200);
    assert_eq!(login_raw(&app, "carl", USER_PASSWORD, None).await.0, 200);
}

#[tokio::test]
async fn the_last_enabled_admin_cannot_be_demoted_or_disabled() {
    let app = spawn_app().await;
    for body in [
        json!({"role": "operator"}),
        json!({"role": "viewer"}),
        json!({"disabled": true}),
    ] {
        let (s, v) = patch_user(&app, &app.admin_token, "admin", body).await;
        assert!(s == 400 || s == 409, "{s} {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("last"),
            "{v}"
        );
    }
    assert_eq!(role_of(&app, "admin").await, "admin");
    // Nothing was revoked by the refused changes.
    assert_eq!(app.get(&app.admin_token, "/api/v1/users").await.0, 200);

    // A disabled second admin does not count; an enabled one does.
    create_user(&app, "root2", USER_PASSWORD, "admin").await;
    let (s, _) = patch_user(&app, &app.admin_token, "root2", json!({"disabled": true})).await;
    assert_eq!(s, 200);
    let (s, _) = patch_user(&app, &app.admin_token, "admin", json!({"role": "viewer"})).await;
    assert!(s == 400 || s == 409);
    let (s, _) = patch_user(&app, &app.admin_token, "root2", json!({"disabled": false})).await;
    assert_eq!(s, 200);
    let (s, v) = patch_user(&app, &app.admin_token, "admin", json!({"role": "viewer"})).await;
    assert_eq!((s, &v["role"]), (200, &json!("viewer")), "{v}");
    // Now root2 is the last one, and admin's token lost its rights.
    assert_eq!(app.get(&app.admin_token, "/api/v1/users").await.0, 401);
    let root2 = app.login("root2", USER_PASSWORD).await;
    let (s, _) = patch_user(&app, &root2, "root2", json!({"role": "operator"})).await;
    assert!(s == 400 || s == 409);
    assert_eq!(app.get(&root2, "/api/v1/users").await.0, 200);
}

/// A creation with a field the API does not have is refused, not half-applied: `"disabled":
/// true` used to be ignored, and the account was created enabled.
#[tokio::test]
async fn creating_a_user_with_an_unknown_field_is_refused() {
    let app = spawn_app().await;
    let (s, v) = app
        .post(
            &app.admin_token,
            "/api/v1/users",
            json!({"username": "zed", "password": "a long enough password", "role": "viewer", "disabled": true}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (s, list) = app.get(&app.admin_token, "/api/v1/users").await;
    assert_eq!(s, 200);
    assert!(
        !list.to_string().contains("\"zed\""),
        "nothing created: {list}"
    );
}
